"""The checkpoint format: one writer and one reader of a trained model's file.

A checkpoint is a plain dict of tensors and plain values, written atomically and loaded with
`weights_only=True` (nothing in it is unpickled into code). `Checkpoint` is its one typed view:
the training loop writes one per best epoch and kept epoch, soups are written as one, and every
reader (members, predictions, reports, the MLflow model) goes through `Checkpoint.load`, so no
other file spells a checkpoint's keys. `trainables.store` owns where checkpoints lie.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainables.files import atomic_write

if TYPE_CHECKING:
    from trainables.config import TrainConfig

FORMAT = 1
AUTO_TTA = "auto"  # predict with the views the model's own training made label-preserving


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Writes a dict of tensors and plain values atomically: a reader never sees a half-written
    file, and a crash mid-write leaves the old one intact."""
    import torch

    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict:
    """Loads a dict written by `save_checkpoint` onto the CPU without unpickling arbitrary
    objects."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class Checkpoint:
    """A trained model: its weights and everything needed to rebuild, run and judge it.

    Attributes:
        model: The unwrapped model's state dict (on the CPU).
        config: The training settings it was trained with (`TrainConfig` as a dict).
        class_names: The classes its outputs stand for, in order.
        image_size: Side of the square uint8 images it takes.
        mean, std: Per-channel normalisation it expects (0-1 scale).
        epoch: The epoch these weights are from.
        metrics: Its val figures at that epoch (val_acc, val_loss, val_f1), if it had val.
        init_id: Content hash of the shared start it was fine-tuned from (soups need one start).
        split_hash: The split it was trained on (members of one ensemble must share it).
        val_indices, val_probs: The val images (data indices) and its probabilities of them.
        tta: Test-time augmentation views to average over when predicting: `auto` (the
            default) the views its own training made label-preserving (models.predict), or
            those a saved ensemble chose.
        soup: For a soup, how it was made: combiner, ingredients, bn_recalibrated.
    """

    model: dict[str, Any]
    config: dict[str, Any]
    class_names: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    init_id: str = ""
    split_hash: str = ""
    val_indices: np.ndarray | None = None
    val_probs: np.ndarray | None = None
    tta: list[str] = field(default_factory=lambda: [AUTO_TTA])
    soup: dict[str, Any] | None = None

    @property
    def train_config(self) -> TrainConfig:
        from trainables.config import TrainConfig

        return TrainConfig.from_dict(self.config)

    @property
    def arch(self) -> str:
        """The timm model name."""
        return str(self.config["model"])

    @property
    def val_acc(self) -> float:
        return float(self.metrics.get("val_acc", float("nan")))

    def slim(self) -> Checkpoint:
        """The same model without its stored val predictions (what prediction needs)."""
        return dataclasses.replace(self, val_indices=None, val_probs=None)

    # ------------------------------------------------------------------ the file

    def to_dict(self) -> dict[str, Any]:
        import torch

        doc: dict[str, Any] = {
            "format": FORMAT, "model": self.model, "config": self.config,
            "class_names": list(self.class_names), "image_size": int(self.image_size),
            "mean": list(self.mean), "std": list(self.std), "epoch": int(self.epoch),
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "init_id": self.init_id, "split_hash": self.split_hash}
        if self.val_indices is not None:
            doc["val_indices"] = torch.tensor(np.asarray(self.val_indices, np.int64))
            doc["val_probs"] = torch.from_numpy(np.asarray(self.val_probs, np.float32))
        if self.tta != [AUTO_TTA]:
            doc["tta"] = list(self.tta)
        if self.soup is not None:
            doc |= {"kind": "soup", **self.soup}
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Checkpoint:
        soup = {k: doc[k] for k in ("combiner", "bn_recalibrated", "ingredients") if k in doc} \
            if doc.get("kind") == "soup" else None
        val_idx, val_probs = doc.get("val_indices"), doc.get("val_probs")
        return cls(model=doc["model"], config=dict(doc["config"]),
                   class_names=list(doc["class_names"]), image_size=int(doc["image_size"]),
                   mean=list(doc["mean"]), std=list(doc["std"]), epoch=int(doc.get("epoch", 0)),
                   metrics=dict(doc.get("metrics") or {}), init_id=doc.get("init_id", ""),
                   split_hash=doc.get("split_hash", ""),
                   val_indices=None if val_idx is None else val_idx.numpy(),
                   val_probs=None if val_probs is None else val_probs.numpy(),
                   tta=list(doc.get("tta", [AUTO_TTA])), soup=soup)

    def save(self, path: str | Path) -> None:
        save_checkpoint(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        return cls.from_dict(load_checkpoint(path))

    @staticmethod
    def is_model(doc: dict[str, Any]) -> bool:
        """Whether a loaded file is a model checkpoint (not a vote over several)."""
        return "model" in doc and "class_names" in doc
