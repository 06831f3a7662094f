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


def train_transform(policy: str, image_size: int, *, hflip: bool = False, seed: int = 0):
    """A label-preserving albumentations pipeline, or None for `policy='none'`.

    `light` suits most data (small shifts, scale, rotation, brightness/contrast); `strong` adds
    colour jitter, blur and cutout. Flips are off by default because they change the meaning of
    digits, letters and hand signs; turn them on with `hflip` for natural photos.
    """
    import albumentations as A

    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}")
    if policy == "none" and not hflip:
        return None
    ops = [A.HorizontalFlip(p=0.5)] if hflip else []
    if policy in ("light", "strong"):
        ops += [
            A.Affine(translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-10, 10), p=0.8),
            A.RandomBrightnessContrast(0.2, 0.2, p=0.5),
        ]
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
