"""What a saved model file is, and the one way to rebuild a network from one.

Two kinds of files hold models: a training checkpoint (`trainables.checkpoint.Checkpoint`: one
network, written by the training loop and by soups) and a vote (`Vote`: weights over member
checkpoints, written by `ensemble.build`). `read` tells them apart; `load_model` rebuilds the
network of a checkpoint. Nothing else opens these files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trainables.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

VOTE = "vote"


@dataclass
class Vote:
    """A (weighted) soft or hard vote over member checkpoints: an ensemble of several networks.

    `members` are checkpoint paths; in the file they are stored relative to the file's folder,
    so an experiment folder can move.
    """

    members: list[str]
    weights: list[float]
    hard: bool = False
    tta: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        rel = [os.path.relpath(Path(m).resolve(), path.parent.resolve()) for m in self.members]
        save_checkpoint({"kind": VOTE, "members": rel, "weights": list(self.weights),
                         "hard": self.hard, "tta": list(self.tta)}, path)

    @classmethod
    def from_dict(cls, doc: dict, folder: Path) -> Vote:
        return cls([str(folder / m) for m in doc["members"]], list(doc["weights"]),
                   bool(doc.get("hard", False)), list(doc.get("tta") or []))


def read(path: str | Path) -> Vote | Checkpoint:
    """The model file at `path`: a vote over members (their paths made absolute) or one
    network's checkpoint."""
    path = Path(path)
    doc = load_checkpoint(path)
    if doc.get("kind") == VOTE:
        return Vote.from_dict(doc, path.parent)
    return Checkpoint.from_dict(doc)


def load_model(source: str | Path | Checkpoint, device: torch.device | None = None
               ) -> tuple[nn.Module, Checkpoint]:
    """The network of a training checkpoint (a path or a loaded one), in eval mode on `device`
    (default: the GPU when there is one); returns (network, checkpoint)."""
    from trainables.models import create_model, import_plugins
    from trainables.train import default_device

    ckpt = source if isinstance(source, Checkpoint) else Checkpoint.load(source)
    cfg = ckpt.train_config
    import_plugins(cfg.plugins)  # a custom architecture registers itself on import
    model = create_model(cfg.model, len(ckpt.class_names), drop_rate=cfg.dropout)
    model.load_state_dict(ckpt.model)
    return model.to(device or default_device()).eval(), ckpt
