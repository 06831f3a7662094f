"""Training batches at the speed of the device: from decoded uint8 images to a normalised,
augmented float batch where the model trains.

Every random parameter of an epoch's augmentation is drawn at once from the seed and the epoch
(`BatchAugment.draw`); where the augmentation runs only decides which kernels apply them:

- On a GPU (`--augment-device auto`, the default): the decoded dataset stays resident in GPU
  memory when it fits (`fits_on_device`), so a batch is an index into it: a gather, the
  augmentation as batched tensor ops and the normalisation, all on the device, the epoch's
  parameters and order copied once (no host synchronisation per step). When it does not fit,
  loader workers gather batches on the host into page-locked memory and each is copied one
  batch ahead on a side stream (as timm's PrefetchLoader does), then augmented on the GPU.
- On the CPU (`--augment-device cpu`, and always on a CPU node): OpenCV applies the same
  parameters image by image in native code (`BatchAugment.apply_numpy`, several times faster
  than albumentations' per-image Python), in the training process or in `--loader-workers`
  processes (torch's DataLoader, persistent and prefetching across epochs, handing over small
  batches in groups through shared memory), so no thread holds the GIL of the training step.

Whatever the placement or the number of workers, a batch holds the same images with the same
augmentation parameters: everything random is a function of the seed, the epoch and the
batch's place.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from trainables.augment import normalize
from trainables.batch_augment import BatchAugment, Params

# Share of a GPU's free memory the decoded images may take when they are kept resident on it:
# the rest is the model's (weights, optimizer state, activations of a batch, cuDNN workspace).
# Trials sharing one GPU (--gpus-per-worker 0.5) divide it between them.
RESIDENT_SHARE = 0.5

# Loader workers hand over batches in groups of about this many bytes (at most GROUP_MAX
# batches): each hand-over costs the training process the DataLoader's queues and bookkeeping
# (~0.5 ms), a quarter of a core at 64 px, where a batch of 64 images is 0.8 MB and takes a
# worker 2-3 ms; at 128 px and above a batch is a group of its own.
GROUP_BYTES = 3_000_000
GROUP_MAX = 8


def fits_on_device(nbytes: int, free_bytes: int, *, sharing: int = 1,
                   share: float = RESIDENT_SHARE) -> bool:
    """Whether `nbytes` of decoded images may stay resident on a GPU with `free_bytes` free,
    shared by `sharing` runs: at most `share` of the free memory, divided among them."""
    return nbytes <= share * free_bytes / max(1, sharing)


def gpu_sharing(gpus_per_worker: float | None) -> int:
    """How many runs share this process's GPU (a trial with 0.5 GPU shares it with another)."""
    if not gpus_per_worker or gpus_per_worker >= 1:
        return 1
    return max(1, round(1 / gpus_per_worker))


@dataclass
class Placement:
    """Where a run's training images live and where they are augmented (for the record)."""

    augment: str  # the device whose kernels augment: "cuda" or "cpu"
    images: str  # "device" (resident on the GPU) or "host" (gathered on the host, copied)


class TrainBatches:
    """Every training batch of one run, epoch after epoch, as (x, y, seconds waited): x float
    NCHW normalised on the device, y int64 labels on the device.

    Args:
        images, labels: The decoded (N, H, W, 3) uint8 images and (N,) labels (numpy arrays,
            e.g. zero-copy views of Ray's object store).
        order_of: The run's training images of an epoch, in order (data indices); batch b of the
            epoch is order[b * batch_size:(b + 1) * batch_size]. Defined for every epoch:
            loader workers build the next epoch's first batches ahead.
        seed_of: The seed of an epoch's augmentation parameters.
        augment: The augmentation policy's `BatchAugment`, or None (no augmentation).
        tensor_augment: Augment with tensor ops on `device` (what a GPU does), else with OpenCV
            on the host.
        resident: Keep the images on `device` (a batch is an index into them); needs
            `tensor_augment`.
        workers: Loader processes building host batches (0: in this process).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                 n_batches: int, device: torch.device, order_of: Callable[[int], np.ndarray],
                 seed_of: Callable[[int], int], mean: torch.Tensor, std: torch.Tensor,
                 channels_last: bool, augment: BatchAugment | None, tensor_augment: bool,
                 resident: bool, workers: int = 0, prefetch: int = 2,
                 pin_memory: bool = True) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.n_batches, self.device = batch_size, n_batches, device
        self.order_of, self.seed_of = order_of, seed_of
        self.mean, self.std, self.channels_last = mean, std, channels_last
        self.augment = augment
        cuda = device.type == "cuda"
        self.tensor_augment = tensor_augment
        self.resident = resident and tensor_augment
        self.placement = Placement(device.type if tensor_augment else "cpu",
                                   "device" if self.resident else "host")
        self.side = int(images.shape[1])
        if self.resident:  # the whole set, once
            self.dev_images = _as_tensor(images).to(device)
            self.dev_labels = _as_tensor(labels).to(device)
        else:
            self.keys = _EpochKeys(self)
            self.stream, self.at = None, (0, 0)  # the loader's iterator, its next batch
            self.pending: list[tuple[int, int]] = []  # a group's batches not yet asked for
            self.pin_memory = pin_memory and cuda
            self.loader = _loader(self, workers, prefetch)
            self.side_stream = torch.cuda.Stream() if cuda else None

    def epoch(self, epoch: int, count: int | None = None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        """The epoch's batches, or its first `count` (a fitted run's last epoch ends early)."""
        count = self.n_batches if count is None else min(count, self.n_batches)
        order = self.order_of(epoch)
        params = self._params(epoch, len(order)) if self.tensor_augment else None
        if self.resident:
            idx = torch.from_numpy(np.ascontiguousarray(order)).to(self.device,
                                                                   non_blocking=True)
            for b in range(count):
                rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
                sel = idx[rows]
                x = self.dev_images.index_select(0, sel).permute(0, 3, 1, 2)
                yield self._finish(x, params, rows), self.dev_labels.index_select(0, sel), 0.0
            return
        batches = self._host_batches(epoch)
        ahead, waited = self._copy(batches, epoch)
        for b in range(count):
            x, y = ahead
            if self.side_stream is not None:  # the copy ran on the side stream
                torch.cuda.current_stream().wait_stream(self.side_stream)
                x.record_stream(torch.cuda.current_stream())
                y.record_stream(torch.cuda.current_stream())
            if b + 1 < count:  # the next batch travels while this one trains
                ahead, wait_next = self._copy(batches, epoch)
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self._finish(x, params, rows), y, waited
            waited = wait_next if b + 1 < count else 0.0

    def close(self) -> None:
        """Stops the loader workers (a persistent loader keeps them between epochs)."""
        loader = getattr(self, "loader", None)
        if loader is not None and getattr(loader, "_iterator", None) is not None:
            loader._iterator._shutdown_workers()
            loader._iterator = None
        self.stream = None

    # ------------------------------------------------------------------ helpers

    def _params(self, epoch: int, n: int) -> Params | None:
        """Every image's augmentation parameters of the epoch, drawn at once, copied once."""
        if self.augment is None:
            return None
        return self.augment.draw(n, self.side, epoch_generator(self.seed_of(epoch))) \
            .to(self.device)

    def _copy(self, batches, epoch: int) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
        tick = time.perf_counter()
        x, y = self.next_batch(batches)
        waited = time.perf_counter() - tick
        if self.side_stream is None:
            return (x.to(self.device), y.to(self.device)), waited
        if self.pin_memory:  # page-locked, so the copy below overlaps with compute
            x, y = x.pin_memory(), y.pin_memory()
        with torch.cuda.stream(self.side_stream):
            return (x.to(self.device, non_blocking=True),
                    y.to(self.device, non_blocking=True)), waited

    def host_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's host batches as the loader hands them over (uint8 NCHW, int64), not yet
        copied, normalised or (on the tensor path) augmented: what a benchmark of the loader
        alone reads."""
        batches = self._host_batches(epoch)
        for _ in range(self.n_batches):
            yield self.next_batch(batches)

    def _host_batches(self, epoch: int):
        """The loader's iterator, at batch 0 of `epoch`. Its keys run on past the epoch's end,
        so loader workers build the next epoch's first batches while this process validates;
        it starts again only where the last epoch was left early (a fitted run's end)."""
        if self.stream is None or self.at != (epoch, 0):
            self.keys.epoch, self.at, self.pending = epoch, (epoch, 0), []
            self.stream = iter(self.loader)
        return self.stream

    def next_batch(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """The loader's next host batch as (uint8 NCHW, int64 labels); a worker's images lie in
        its shared slot until `count` later batches have been asked for."""
        epoch, b = self.at
        self.at = (epoch, b + 1) if b + 1 < self.n_batches else (epoch + 1, 0)
        if self.slots is None:
            return next(batches)
        if not self.pending:  # a worker's next group: [(slot, size), ...] in batch order
            self.pending = list(reversed(next(batches)))
        return self.slots.batch(*self.pending.pop())

    def _finish(self, x: torch.Tensor, params: Params | None, rows: slice) -> torch.Tensor:
        """uint8 NCHW on the device -> augmented, normalised float NCHW."""
        if params is not None:
            x = self.augment(x, params.rows(rows.start, rows.stop))
        x = normalize(x, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def epoch_generator(seed: int) -> torch.Generator:
    """The generator an epoch's augmentation parameters are drawn from."""
    return torch.Generator().manual_seed(seed % 2**63)


class _EpochKeys(torch.utils.data.Sampler):
    """The batches of epoch `epoch` and of every epoch after it, in groups of `group`, as keys
    (epoch, first batch, seed, epoch size, each batch's indices) for `_HostBatches` (set
    `epoch` before iterating, as with DistributedSampler.set_epoch). The loader asks for keys
    only as far ahead as it prefetches."""

    def __init__(self, owner: TrainBatches) -> None:
        self.owner, self.epoch, self.group = owner, 0, 1  # `_loader` sets the group

    def __iter__(self):
        o, size = self.owner, self.owner.batch_size
        for epoch in itertools.count(self.epoch):
            order, seed = o.order_of(epoch), o.seed_of(epoch)
            for b in range(0, o.n_batches, self.group):
                stop = min(b + self.group, o.n_batches)
                yield (epoch, b, seed, len(order),
                       [order[i * size:(i + 1) * size] for i in range(b, stop)])

    def __len__(self) -> int:  # an epoch's keys (the iterator runs on into the next epochs)
        return -(-self.owner.n_batches // self.group)


class _HostBatches(torch.utils.data.Dataset):
    """Builds the batches of a key on the host: gathered from the decoded arrays, and (when
    the augmentation runs on the CPU) augmented with OpenCV. In the training process (one batch
    per key) as uint8 NCHW and int64 labels; in a loader worker into shared slots, handing over
    [(slot, size), ...]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: BatchAugment | None,
                 batch_size: int, slots: _Slots | None = None) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.batch_size, self.slots = batch_size, slots
        self.side = int(images.shape[1])
        self.drawn: tuple[int, Params] | None = None  # the epoch's parameters, drawn once

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor] | list[tuple[int, int]]:
        epoch, first, seed, n, batches = key
        if self.slots is None:
            (idx,) = batches
            return self._batch(epoch, first, seed, n, idx)
        return [self._batch(epoch, first + i, seed, n, idx) for i, idx in enumerate(batches)]

    def _batch(self, epoch: int, b: int, seed: int, n: int, idx: np.ndarray
               ) -> tuple[torch.Tensor, torch.Tensor] | tuple[int, int]:
        slot = self.slots.slot(epoch, b) if self.slots is not None else None
        out = None if slot is None else self.slots.images[slot, :len(idx)].numpy()
        if self.augment is None:
            x = np.take(self.images, idx, axis=0, out=out)
        else:
            if self.drawn is None or self.drawn[0] != epoch:  # the epoch's, as on a GPU
                self.drawn = (epoch, self.augment.draw(n, self.side, epoch_generator(seed)))
            start = b * self.batch_size
            x = self.augment.apply_numpy(np.take(self.images, idx, axis=0),
                                         self.drawn[1].rows(start, start + len(idx)), out=out)
        if slot is not None:  # only the slot's number and the batch's size travel back
            self.slots.labels[slot, :len(idx)].numpy()[:] = self.labels[idx]
            return slot, len(idx)
        y = np.asarray(self.labels[idx], np.int64)
        return torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y)

    def __len__(self) -> int:
        return 0


class _Slots:
    """A ring of batch buffers in shared memory, allocated once, that loader workers write
    their batches (images and labels) into: only a slot's number and the batch's size cross
    between processes. (torch's DataLoader otherwise moves every tensor of a batch, the labels
    too, through a fresh shared-memory segment and a file descriptor, which at 64 px cost the
    training process as much as building the batch: one worker delivered half of what the same
    work gave in-process.)

    Batch b of epoch e goes to slot (e * n_batches + b) % count. A slot is reused only after
    `count` later batches have been asked for; the loader keeps at most workers x prefetch
    groups of batches in flight, the training side the rest of its current group and two more
    (the one it finishes, the one ahead).
    """

    def __init__(self, count: int, batch_size: int, side: int, n_batches: int) -> None:
        self.count, self.n_batches = count, n_batches
        self.images = torch.empty((count, batch_size, side, side, 3),
                                  dtype=torch.uint8).share_memory_()
        self.labels = torch.empty((count, batch_size), dtype=torch.int64).share_memory_()

    def slot(self, epoch: int, b: int) -> int:
        return (epoch * self.n_batches + b) % self.count

    def batch(self, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The images as a view of the slot, the labels copied out (a step may keep them)."""
        return self.images[slot, :n].permute(0, 3, 1, 2), self.labels[slot, :n].clone()


def _loader(o: TrainBatches, workers: int, prefetch: int) -> torch.utils.data.DataLoader:
    """torch's DataLoader over the epoch's batch keys: `workers` persistent processes building
    batches ahead into shared slots (each with one thread, OpenCV's included), or none (built
    in this process when asked)."""
    prefetch = max(1, prefetch)
    group = 1
    if workers > 0:
        group = max(1, min(GROUP_MAX, round(GROUP_BYTES / (o.batch_size * o.side ** 2 * 3))))
    o.keys.group = group
    o.slots = _Slots((workers * prefetch + 1) * group + 3, o.batch_size, o.side, o.n_batches) \
        if workers > 0 else None
    dataset = _HostBatches(o.images, o.labels, None if o.tensor_augment else o.augment,
                           o.batch_size, o.slots)
    extra = {}
    if workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": prefetch,
                 "worker_init_fn": _one_thread}
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=o.keys,
                                       num_workers=workers, **extra)


def _one_thread(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # the workers are the parallelism


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing `a`'s memory, also when `a` is read-only (Ray's object store): it is
    only ever read."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.as_tensor(np.asarray(a))
