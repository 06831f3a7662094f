"""The albumentations reference pipelines (tests and benchmarks check the batched engine against
them), normalisation, and the evaluation batches of one worker.

Normalisation happens per batch on the device (`normalize`), so the CPU side only moves uint8.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from trainables.config import POLICIES

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network


def train_transform(policy: str, image_size: int, *, hflip: bool = False,
                    dihedral: bool = False, seed: int = 0):
    """A label-preserving albumentations pipeline, or None for `policy='none'`.

    `light` suits most data (small shifts, scale, rotation, brightness/contrast); `strong` adds
    colour jitter, blur and cutout. Flips are off by default because they change the meaning of
    digits, letters and hand signs; turn them on with `hflip` for natural photos. `dihedral` adds
    quarter turns and vertical flips, for images without an up or down (microscopy, aerial), in
    place of the small shifts, turns and scalings (blood-cell scans made fewer errors with the
    exact symmetries alone than with both).
    """
    import albumentations as A

    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}")
    if policy == "none" and not hflip and not dihedral:
        return None
    ops = [A.HorizontalFlip(p=0.5)] if hflip else []
    ops += [A.RandomRotate90(p=1.0), A.VerticalFlip(p=0.5)] if dihedral else []
    if policy in ("light", "strong"):
        if not dihedral:  # the exact symmetries take the place of the small affine jitter
            ops += [A.Affine(translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-10, 10),
                             p=0.8)]
        ops += [A.RandomBrightnessContrast(0.2, 0.2, p=0.5)]
    if policy == "strong":
        hole = max(1, image_size // 4)
        ops += [
            A.ColorJitter(0.3, 0.3, 0.3, 0.05, p=0.5),
            A.GaussianBlur(blur_limit=(3, 3), p=0.1),
            A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(hole // 2, hole),
                            hole_width_range=(hole // 2, hole), p=0.5),
        ]
    return A.Compose(ops, seed=seed)


def normalize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 NCHW (or float NCHW in [0, 1], as `BatchAugment` returns) -> float NCHW scaled like
    the model's pretraining data.

    `mean`/`std` are per-channel lists (as checkpoints store them) or tensors; either is moved to
    the batch's device and broadcast over (N, C, H, W).
    """
    own = not x.is_floating_point()
    x = x.float().div_(255.0) if own else x
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if own:  # a batch of our own: in place, one float copy of it at a time, not three
        return x.sub_(mean).div_(std)
    return (x - mean) / std


def eval_batches(images: np.ndarray | torch.Tensor, indices: np.ndarray | None = None,
                 batch_size: int = 256, device: torch.device | None = None
                 ) -> Iterator[torch.Tensor]:
    """Yields uint8 NCHW batches of `images[indices]` (all images when `indices` is None); a
    tensor of images (resident on a GPU) is gathered where it lies."""
    n = len(images) if indices is None else len(indices)
    if isinstance(images, torch.Tensor):
        idx = None if indices is None else torch.as_tensor(np.asarray(indices),
                                                           device=images.device)
        for s in range(0, n, batch_size):
            part = images[s:s + batch_size] if idx is None else images[idx[s:s + batch_size]]
            yield part.permute(0, 3, 1, 2)
        return
    for s in range(0, n, batch_size):
        idx = slice(s, s + batch_size) if indices is None else indices[s:s + batch_size]
        yield torch.from_numpy(np.array(images[idx])).permute(0, 3, 1, 2)  # own, writable copy


# Whether images have an up and a down, measured on the decoded data: photos of things and
# scenes (clothing, hands, digits) have more horizontal than vertical edges, or a mean image that a
# quarter turn changes; microscopy, aerial and texture images have neither. At 64 px (vertical /
# horizontal gradient energy; the mean image's change under a quarter turn, in units of the
# images' own contrast): blood-cell scans 1.01 and 0.08, clothing photos 0.81 and 0.18, sign
# photos 0.56 and 0.62, scikit-learn's digits 0.55 and 0.81, uniform noise 1.00 and 0.05.
ISOTROPIC_GRADIENTS = (0.9, 1.1)
ISOTROPIC_MEAN_TURN = 0.1  # beyond chance: the mean of n images moves ~1.13 / sqrt(n) anyway
ORIENTATION_SAMPLE = 2000


def orientation(images: np.ndarray, seed: int = 0) -> dict[str, float | bool]:
    """How much the images have an up and a down: `gradients` (mean |d/dy| over mean |d/dx|,
    1 when no direction is favoured), `mean_turn` (how much a quarter turn changes the mean
    image, relative to the images' mean contrast) and `free` (both say there is no up or down,
    so quarter turns and vertical flips keep the images' meaning). Reads at most
    ORIENTATION_SAMPLE images; images that are not square are never free."""
    n = len(images)
    rows = np.arange(n) if n <= ORIENTATION_SAMPLE else np.sort(
        np.random.default_rng(seed).choice(n, ORIENTATION_SAMPLE, replace=False))
    shape = images.shape[1:3]
    if not len(rows) or shape[0] != shape[1] or shape[0] < 2:
        return {"gradients": float("nan"), "mean_turn": float("nan"), "free": False}
    dy = dx = contrast = 0.0
    total = np.zeros(shape, np.float64)
    for start in range(0, len(rows), 128):  # a chunk at a time: 2,000 images at 224 px in
        grey = np.asarray(images[rows[start:start + 128]], np.float32).mean(-1)  # float: 400 MB
        dy += float(np.abs(np.diff(grey, axis=1)).mean(axis=(1, 2)).sum())
        dx += float(np.abs(np.diff(grey, axis=2)).mean(axis=(1, 2)).sum())
        contrast += float(grey.std(axis=(1, 2)).sum())
        total += grey.sum(0)
    mean = total / len(rows)
    turn = float(np.abs(mean - np.rot90(mean)).mean()) / max(contrast / len(rows), 1e-6)
    gradients = dy / max(dx, 1e-6)
    free = (ISOTROPIC_GRADIENTS[0] <= gradients <= ISOTROPIC_GRADIENTS[1]
            and turn <= ISOTROPIC_MEAN_TURN + 1.13 / np.sqrt(len(rows)))
    return {"gradients": round(gradients, 3), "mean_turn": round(turn, 3), "free": bool(free)}
