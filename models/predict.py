"""Prediction with any saved model: test-time augmentation, timed batches, the loaded
ensemble (`load`), and the predictions CSV."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from models.artifact import Vote, load_model, read
from models.vote import hard_vote, soft_vote
from trainables.checkpoint import AUTO_TTA as AUTO
from trainables.checkpoint import Checkpoint
from trainables.errors import UserError
from trainables.train import predict_proba

TTA_VIEWS = ("hflip", "vflip", "shift", "crop")


def tta_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """A label-preserving view of a uint8 NCHW batch (which views preserve labels is data-specific:
    a flip changes a digit or a letter, so `auto` adds the mirror only where a model trained
    with flips)."""
    if view == "hflip":
        return x.flip(-1)
    if view == "vflip":
        return x.flip(-2)
    size = x.shape[-1]
    if view == "shift":  # move the content right and down by 1/16 of the side
        s = max(1, size // 16)
        return F.pad(x, (s, 0, s, 0))[..., :size, :size]
    if view == "crop":  # centre 90 %, scaled back up
        c = max(1, int(round(size * 0.05)))
        inner = x[..., c:size - c, c:size - c].float()
        return F.interpolate(inner, size=(size, size), mode="bilinear",
                             align_corners=False).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"unknown TTA view {view!r}")


def check_tta(views: list[str]) -> list[str]:
    """The --tta views as given: `auto` (each model's own symmetries), `none`, or a list of
    TTA_VIEWS; `none` comes back as no views."""
    if views == ["none"]:
        return []
    if views == [AUTO]:
        return views
    unknown = [v for v in views if v not in TTA_VIEWS]
    if unknown or not views:
        what = f"unknown --tta view(s) {', '.join(unknown)}" if unknown else "--tta is empty"
        raise UserError(f"{what}; pass auto (each model's own flips), none, or views from "
                        f"{', '.join(TTA_VIEWS)}")
    return views


# Each model averages over the views its own training made it invariant to: a horizontal flip
# where it trained with flips (`hflip`) or with all eight symmetries of the square (`dihedral`),
# none where it did not (digits, letters, signs a user keeps unflipped). On 16 kept recipes
# (blood scans and clothing photos, K = 2's length, benchmarks/RESULTS.md §0o) the flipped view
# cut test errors by 14 % and 4 %; the eight symmetries on the scans did less than the one flip.
def own_views(ckpt: Checkpoint) -> list[str]:
    """The views a model's training made label-preserving: the horizontal flip where it trained
    with flips or with the square's eight symmetries, else none."""
    cfg = ckpt.config
    return ["hflip"] if cfg.get("hflip") or cfg.get("dihedral") else []


def resolve_views(tta: list[str], ckpt: Checkpoint) -> list[str]:
    """`tta` with `auto` replaced by the checkpoint's own views."""
    return own_views(ckpt) if AUTO in tta else list(tta)


def predict_views(model: nn.Module, images: np.ndarray, *, mean: list[float], std: list[float],
                  tta: list[str], batch_size: int = 256) -> np.ndarray:
    """Mean softmax over the plain images and each TTA view (uint8 NHWC in, (N, C) out)."""
    probs = predict_proba(model, images, mean=mean, std=std, batch_size=batch_size)
    for view in tta:
        nchw = tta_view(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2), view)
        views = nchw.permute(0, 2, 3, 1).contiguous().numpy()
        probs = probs + predict_proba(model, views, mean=mean, std=std, batch_size=batch_size)
    return probs / (1 + len(tta))


def predict(model: nn.Module, images: np.ndarray, ckpt: Checkpoint, tta: list[str]
            ) -> np.ndarray:
    """Predictions with the checkpoint's normalisation, untimed: for val scores, whose cost
    nobody reads (no warm-up batch). `auto` in `tta`: the checkpoint's own views."""
    return predict_views(model, images, mean=ckpt.mean, std=ckpt.std,
                         tta=resolve_views(tta, ckpt))


def timed_predict(model: nn.Module, images: np.ndarray, ckpt: Checkpoint, tta: list[str]
                  ) -> tuple[np.ndarray, float]:
    """Predictions and the measured milliseconds per image (after a full warm-up batch, so
    one-off kernel set-up is not billed to whichever member happens to run first)."""
    predict_views(model, images[:256], mean=ckpt.mean, std=ckpt.std, tta=[])
    start = time.perf_counter()
    probs = predict(model, images, ckpt, tta)
    return probs, 1000 * (time.perf_counter() - start) / max(len(images), 1)


class EnsembleModel:
    """A saved ensemble: one model (single or soup) or a weighted vote of several.

    `predict_proba(images)` takes uint8 (N, H, W, 3) arrays at `image_size` and returns (N, C)
    class probabilities, applying the ensemble's own TTA views (`auto`: each member's own).
    """

    def __init__(self, models: list[nn.Module], ckpts: list[Checkpoint], weights: list[float],
                 *, hard: bool = False, tta: list[str] | None = None) -> None:
        self.models, self.ckpts, self.weights, self.hard = models, ckpts, weights, hard
        self.tta = list(tta or [])
        self.class_names: list[str] = list(ckpts[0].class_names)
        self.image_size: int = int(ckpts[0].image_size)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        probs = [predict_views(m, images, mean=c.mean, std=c.std,
                               tta=resolve_views(self.tta, c))
                 for m, c in zip(self.models, self.ckpts)]
        return (hard_vote if self.hard else soft_vote)(probs, self.weights)


def load(path: str | Path, device: torch.device | None = None) -> EnsembleModel:
    """Loads any saved model: a vote of member checkpoints (what `ensemble.build` saves), a
    soup, a trial's or a refit's checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ensemble file {path} does not exist; run python -m ensemble.build")
    saved = read(path)
    if isinstance(saved, Vote):
        loaded = [load_model(m, device) for m in saved.members]
        return EnsembleModel([m for m, _ in loaded], [c for _, c in loaded], saved.weights,
                             hard=saved.hard, tta=saved.tta)
    model, ckpt = load_model(saved, device)
    return EnsembleModel([model], [ckpt], [1.0], tta=saved.tta)


def predictions_frame(ids: list[str], probs: np.ndarray, class_names: list[str],
                      labels: np.ndarray | None = None) -> pd.DataFrame:
    """image id, predicted class name, (true class,) one probability column per class."""
    frame = pd.DataFrame({"image": ids, "prediction": [class_names[i] for i in probs.argmax(1)]})
    if labels is not None:
        frame["label"] = [class_names[i] for i in labels]
    for j, name in enumerate(class_names):
        frame[f"prob_{name}"] = probs[:, j].round(6)
    return frame
