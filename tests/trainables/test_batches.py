"""Training batches: what they hold does not depend on the loader workers or the placement;
the GPU-residency decision; no host synchronisation or random draw per training step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from trainables import batches as batches_module
from trainables.batch_augment import batch_transform
from trainables.batches import TrainBatches, fits_on_device, gpu_sharing
from trainables.config import TrainConfig
from trainables.data import load_data
from trainables.inputs import TrialInputs
from trainables.models import initial_state
from trainables.split import draw_split
from trainables.train import fit

SIDE, BS = 32, 8


def test_images_stay_resident_on_the_gpu_when_they_fit_their_share():
    gib = 2**30
    assert fits_on_device(10 * gib, 40 * gib)  # a quarter of the free memory
    assert not fits_on_device(30 * gib, 40 * gib)  # over half of it
    assert not fits_on_device(15 * gib, 40 * gib, sharing=2)  # two trials share the GPU
    assert fits_on_device(9 * gib, 40 * gib, sharing=2)
    assert [gpu_sharing(g) for g in (None, 0, 1.0, 2.0, 0.5, 0.25, 0.3)] == [1, 1, 1, 1, 2, 4, 3]


def _batches(images, labels, workers: int, policy: str = "strong", *, tensor: bool = False,
             resident: bool = False) -> TrainBatches:
    def order_of(e: int) -> np.ndarray:  # any epoch: loader workers run ahead into the next
        return np.random.default_rng(e).permutation(len(images))

    return TrainBatches(images, labels, batch_size=BS, n_batches=len(images) // BS,
                        device=torch.device("cpu"), order_of=order_of,
                        seed_of=lambda e: 100 + e, mean=torch.zeros(3).view(1, 3, 1, 1),
                        std=torch.ones(3).view(1, 3, 1, 1), channels_last=False,
                        augment=batch_transform(policy, hflip=True), tensor_augment=tensor,
                        resident=resident, workers=workers, prefetch=2)


def _images(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)
    images.flags.writeable = False  # as Ray's object store hands them to a worker
    return images, np.arange(n, dtype=np.int64) % 3


def _epochs(batches: TrainBatches) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    try:
        return [[(x.clone(), y.clone()) for x, y, _ in batches.epoch(e)] for e in (1, 2)]
    finally:
        batches.close()


def test_resident_and_streamed_batches_are_the_same():
    """Images resident on the device (gathered there) or streamed from the host (gathered by
    loader workers, copied): the same batches, with the tensor kernels a GPU runs."""
    images, labels = _images()
    resident = _epochs(_batches(images, labels, 0, tensor=True, resident=True))
    for workers in (0, 2):
        streamed = _epochs(_batches(images, labels, workers, tensor=True))
        for epoch_a, epoch_b in zip(resident, streamed):
            for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("policy", ["none", "strong"])
def test_batches_do_not_depend_on_the_loader_workers(policy):
    """A batch is a function of the seed, the epoch and its place: 0 (in this process), 1, 2
    or 3 loader processes build the same ones, in the epoch's order, epoch after epoch."""
    images, labels = _images()
    runs = [_epochs(_batches(images, labels, workers, policy)) for workers in (0, 1, 2, 3)]
    for run in runs[1:]:
        for epoch_a, epoch_b in zip(runs[0], run):
            assert len(epoch_a) == len(epoch_b) == 5
            for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
    first = runs[0][0]
    order = np.random.default_rng(1).permutation(len(images))
    for b, (_, y) in enumerate(first):  # labels follow the epoch's order
        assert torch.equal(y, torch.from_numpy(labels[order[b * BS:(b + 1) * BS]]))
    assert not torch.equal(runs[0][0][0][0], runs[0][1][0][0])  # epochs differ


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_an_epoch_left_early_does_not_shift_the_next(monkeypatch):
    """Loader workers build the next epoch's batches ahead, in groups; a run that leaves an
    epoch early (a fitted run's last), mid-group, or skips one still gets each epoch's own
    batches."""
    monkeypatch.setattr(batches_module, "GROUP_MAX", 3)  # 8 batches: groups of 3, 3, 2
    images, labels = _images(64)
    want = {e: [(x.clone(), y.clone()) for x, y, _ in _batches(images, labels, 0).epoch(e)]
            for e in (1, 2, 4)}
    batches = _batches(images, labels, 2)
    try:
        got = {1: [(x.clone(), y.clone()) for x, y, _ in batches.epoch(1, 4)]}
        for e in (2, 4):
            got[e] = [(x.clone(), y.clone()) for x, y, _ in batches.epoch(e)]
    finally:
        batches.close()
    assert batches.keys.group == 3
    assert [len(got[e]) for e in (1, 2, 4)] == [4, 8, 8]
    for e in (1, 2, 4):
        for (xa, ya), (xb, yb) in zip(want[e], got[e]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_batch_on_the_host_is_the_order_s_images():
    images, labels = _images(21)
    batches = _batches(images, labels, 0, "none")
    batches.augment = None  # no augmentation: the images themselves, normalised to [0, 1]
    batches.loader.dataset.augment = None
    got = list(batches.epoch(1))
    order = np.random.default_rng(1).permutation(21)
    assert len(got) == 2  # a ragged end is dropped
    for b, (x, _, _) in enumerate(got):
        idx = order[b * BS:(b + 1) * BS]
        assert torch.allclose(x * 255, torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float())


WATCHED = ("aten::_local_scalar_dense", "aten::item", "aten::uniform_", "aten::random_",
           "aten::randperm", "aten::normal_", "aten::bernoulli_")


def _reads_and_draws(fn, *, skip_optimizer: bool = False) -> dict[str, int]:
    """Host reads (`.item()`) and random draws while `fn` runs; with `skip_optimizer`, not those
    inside an optimizer's own step (torch's CPU optimizers read their step counters)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = dict.fromkeys(WATCHED, 0)
    for e in prof.events():
        if e.name in WATCHED:
            parent, in_optimizer = e.cpu_parent, False
            while skip_optimizer and parent is not None:
                in_optimizer |= parent.name.startswith("Optimizer.step")
                parent = parent.cpu_parent
            counts[e.name] += not in_optimizer
    return counts


def test_resident_tensor_batches_read_nothing_back_and_draw_nothing_per_batch():
    """The GPU's engine (resident images, batched tensor augmentation), run here on the CPU:
    an epoch of 10 batches makes the host reads and random draws of an epoch of 5, i.e. none
    per batch (the epoch's parameters are drawn at once)."""
    def one_epoch(n: int) -> dict[str, int]:
        images, labels = _images(n)
        batches = _batches(images, labels, 0, tensor=True, resident=True)
        return _reads_and_draws(lambda: [x.sum() for x, _, _ in batches.epoch(1)])

    few, many = one_epoch(5 * BS), one_epoch(10 * BS)
    assert many == few, (few, many)
    assert few["aten::uniform_"] + few["aten::bernoulli_"] >= 1  # the epoch's draw


@pytest.fixture
def tiny(make_folder) -> TrialInputs:
    data = load_data(make_folder(classes=3, per_class=12), image_size=SIDE)
    split = draw_split(data.labels, val_fraction=0.2, test_fraction=0.1, seed=0,
                       class_names=data.class_names)
    return TrialInputs(data=data, init_state=initial_state("resnet10t", 3, seed=0),
                       train_idx=split.train, val_idx=split.val)


BASE = TrainConfig(epochs=2, batch_size=4, threads=1, amp="off", augment="strong", hflip=True,
                   keep_last=0)


def _losses(cfg: TrainConfig, inputs: TrialInputs) -> list[float]:
    reports: list[dict] = []
    fit(cfg, inputs, None, report=reports.append)
    return [r["train_loss"] for r in reports] + [r["val_loss"] for r in reports]


def test_training_gives_the_same_result_with_loader_workers(tiny):
    one = _losses(BASE, tiny)
    assert one == _losses(dataclasses.replace(BASE, loader_workers=2, prefetch=1), tiny)
    assert one != _losses(dataclasses.replace(BASE, seed=1), tiny)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_cuda_augmentation_without_cuda_warns_and_augments_on_the_cpu(tiny):
    with pytest.warns(UserWarning, match="augment_device 'cuda'.*on the CPU"):
        on_cuda = _losses(dataclasses.replace(BASE, augment_device="cuda"), tiny)
    assert on_cuda == _losses(BASE, tiny)


def _per_run(cfg: TrainConfig, inputs: TrialInputs) -> dict[str, int]:
    """Host reads and random draws of one run of `fit`, outside the optimizer's own step."""
    return _reads_and_draws(lambda: fit(cfg, inputs, None), skip_optimizer=True)


def test_a_training_step_reads_nothing_back_and_draws_nothing(tiny):
    """Twice the steps, the same host reads and random draws: none of them is per step (the
    epoch's loss is read once, its augmentation parameters drawn once)."""
    cfg = dataclasses.replace(BASE, epochs=1, augment="strong")
    few = _per_run(dataclasses.replace(cfg, batch_size=8), tiny)
    many = _per_run(dataclasses.replace(cfg, batch_size=4), tiny)
    assert many == few, (few, many)
    assert few["aten::uniform_"] >= 1  # the epoch's parameters were drawn


NO_RAY = """
import sys
sys.modules["ray"] = None  # as where Ray is not installed: `import ray` raises ImportError
import numpy as np
from trainables.config import TrainConfig
from trainables.data import ImageData
from trainables.inputs import TrialInputs
from trainables.models import initial_state
from trainables.train import fit

rng = np.random.default_rng(0)
data = ImageData(images=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(24) % 3, class_names=["a", "b", "c"], ids=[])
inputs = TrialInputs(data=data, init_state=initial_state("resnet10t", 3, seed=0),
                     train_idx=np.arange(16), val_idx=np.arange(16, 24))
reports = []
fit(TrainConfig(epochs=2, batch_size=8, threads=1, amp="off", augment="light"), inputs, None,
    report=reports.append)
print("epochs", len(reports), "val_loss" in reports[-1])
"""


def test_fit_on_plain_arrays_runs_where_ray_is_not_installed():
    """benchmarks.gpu runs `fit` on a lent machine that cannot hold Ray's wheel."""
    import subprocess
    import sys

    from benchmarks.common import REPO

    proc = subprocess.run([sys.executable, "-c", NO_RAY], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["epochs", "2", "True"]
