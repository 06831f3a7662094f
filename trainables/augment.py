"""Augmentation (albumentations, on uint8 HWC arrays) and the batch iterators of one worker.

Normalisation happens per batch on the device (`normalize`), so the CPU side only moves uint8.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

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
    x = x if x.is_floating_point() else x.float().div_(255.0)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def train_batches(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, *,
                  batch_size: int, transform=None, drop_last: bool = True, threads: int = 1,
                  prefetch: int = 2, seed: int | None = None, channels_last: bool = False,
                  pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (uint8 NCHW, int64) batches of `images[indices]` in the given order.

    Batches are gathered and augmented by `threads` background threads, up to `prefetch` batches
    per thread ahead of the one training (0: each batch is built in the calling thread when it is
    needed); numpy and OpenCV release the GIL, so the threads run in parallel with each other
    and with the training step. Each batch's augmentation is seeded from (`seed`, its position)
    alone, so what a batch holds does not depend on the number of threads or on which thread
    built it (without a seed, each call draws a fresh one).

    Args:
        channels_last: Leave the batch in the arrays' own HWC memory order (an NCHW tensor with
            channels_last strides), which saves a transposing copy when the model trains in
            channels_last; otherwise the batch is a contiguous NCHW tensor.
        pin_memory: Put the images in page-locked memory, so a `non_blocking` copy to the GPU
            overlaps with compute (needs CUDA).
    """
    stops = range(0, len(indices), batch_size)
    chunks = [indices[s:s + batch_size] for s in stops]
    if drop_last and len(chunks) > 1 and len(chunks[-1]) < batch_size:
        chunks.pop()  # a ragged last batch adds noise, and a batch of one breaks BatchNorm
    seed = np.random.SeedSequence().entropy if seed is None else seed
    if transform is not None:
        import cv2

        # the loader threads are the parallelism; OpenCV's own pool inside each of them would
        # oversubscribe the worker's CPUs (process-wide, as OpenCV has no per-thread setting)
        cv2.setNumThreads(1)
    build = _BatchBuilder(images, labels, transform, seed, channels_last=channels_last,
                          pin_memory=pin_memory)
    if prefetch <= 0:
        yield from map(build, range(len(chunks)), chunks)
        return
    with ThreadPoolExecutor(max(1, threads)) as pool:
        ahead: deque[Future] = deque()
        try:
            for b, idx in enumerate(chunks):
                ahead.append(pool.submit(build, b, idx))
                if len(ahead) > prefetch * max(1, threads):
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:  # the consumer stopped early: do not build batches nobody will take
            for pending in ahead:
                pending.cancel()


class _BatchBuilder:
    """Builds batch number b from its indices; callable from several threads at once.

    albumentations pipelines keep their random state on the object, so each thread augments with
    its own copy, re-seeded for every batch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform, seed: int, *,
                 channels_last: bool, pin_memory: bool) -> None:
        self.images, self.labels, self.transform, self.seed = images, labels, transform, seed
        self.channels_last, self.pin_memory = channels_last, pin_memory
        self.local = threading.local()

    def __call__(self, b: int, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        out = np.empty((len(idx), *self.images.shape[1:]), self.images.dtype)
        if self.transform is None:
            np.take(self.images, idx, axis=0, out=out)  # gathered straight from the shared arrays
        else:
            transform = self._own_transform()
            transform.set_random_seed(batch_seed(self.seed, b))
            for k, i in enumerate(idx):
                out[k] = transform(image=self.images[i])["image"]
        x = torch.from_numpy(out).permute(0, 3, 1, 2)  # NCHW view of HWC memory: channels_last
        x = x if self.channels_last else x.contiguous()
        return (x.pin_memory() if self.pin_memory else x), torch.from_numpy(self.labels[idx])

    def _own_transform(self):
        if not hasattr(self.local, "transform"):
            self.local.transform = copy.deepcopy(self.transform)
        return self.local.transform


def batch_seed(seed: int, batch: int) -> int:
    """The augmentation seed of one batch: independent streams per (seed, batch)."""
    return int(np.random.SeedSequence([seed % 2**63, batch]).generate_state(1)[0])


def eval_batches(images: np.ndarray, indices: np.ndarray | None = None,
                 batch_size: int = 256) -> Iterator[torch.Tensor]:
    """Yields uint8 NCHW batches of `images[indices]` (all images when `indices` is None)."""
    n = len(images) if indices is None else len(indices)
    for s in range(0, n, batch_size):
        idx = slice(s, s + batch_size) if indices is None else indices[s:s + batch_size]
        yield torch.from_numpy(np.array(images[idx])).permute(0, 3, 1, 2)  # own, writable copy
