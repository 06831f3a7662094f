"""The batch loader (threads, prefetch, seeding) and the batched augmentation that runs on the
training device, checked on CPU tensors against the albumentations path it stands in for."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from trainables.augment import train_batches, train_transform
from trainables.data import load_data
from trainables.gpu_augment import batch_transform
from trainables.models import initial_state
from trainables.split import draw_split
from trainables.train import TrainConfig, TrialInputs, fit

SIDE = 32


def _images(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)
    images.flags.writeable = False  # as Ray's object store hands them to a worker
    return images, np.arange(n, dtype=np.int64) % 3


def _all(images, labels, order, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(train_batches(images, labels, order, batch_size=8, **kwargs))


# ---------------------------------------------------------------- the loader


def test_batches_do_not_depend_on_threads_or_prefetch():
    """Each batch is seeded from (seed, its place), so the threads that build it do not matter."""
    images, labels = _images()
    order = np.random.default_rng(1).permutation(len(images))
    transform = train_transform("strong", SIDE, hflip=True)
    runs = [_all(images, labels, order, transform=transform, seed=7, threads=t, prefetch=p)
            for t, p in ((1, 0), (1, 2), (2, 1), (3, 4))]
    for run in runs[1:]:
        assert len(run) == len(runs[0]) == 5
        for (xa, ya), (xb, yb) in zip(runs[0], run):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = _all(images, labels, order, transform=transform, seed=8, threads=2)
    assert not torch.equal(other[0][0], runs[0][0][0])
    assert not torch.equal(runs[0][0][0], runs[0][1][0][:8])  # batches differ from each other


def test_batches_follow_the_order_and_drop_a_ragged_end():
    images, labels = _images(n=21)
    order = np.random.default_rng(2).permutation(21)
    batches = _all(images, labels, order, threads=2)
    assert [len(y) for _, y in batches] == [8, 8]
    for b, (x, y) in enumerate(batches):
        idx = order[b * 8:(b + 1) * 8]
        assert x.dtype == torch.uint8 and x.is_contiguous()
        assert torch.equal(x, torch.from_numpy(images[idx]).permute(0, 3, 1, 2))
        assert torch.equal(y, torch.from_numpy(labels[idx]))


def test_channels_last_batches_keep_the_arrays_memory_order():
    images, labels = _images(n=16)
    plain = _all(images, labels, np.arange(16))
    nhwc = _all(images, labels, np.arange(16), channels_last=True)
    for (a, _), (b, _) in zip(plain, nhwc):
        assert b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous()
        assert torch.equal(a, b)


def test_stopping_early_leaves_no_work_behind():
    images, labels = _images(n=400)
    batches = train_batches(images, labels, np.arange(400), batch_size=8, threads=2, prefetch=4,
                            transform=train_transform("light", SIDE), seed=0)
    first = next(batches)
    batches.close()  # what a consumer that takes fewer batches does when it is collected
    assert first[0].shape == (8, 3, SIDE, SIDE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_batches():
    images, labels = _images(n=16)
    (x, _), _ = _all(images, labels, np.arange(16), pin_memory=True)
    assert x.is_pinned()


# ---------------------------------------------------------------- batched augmentation


def _square(n: int) -> torch.Tensor:
    """n copies of a black image with a white square off the centre (uint8 NCHW)."""
    x = torch.zeros(n, 3, SIDE, SIDE, dtype=torch.uint8)
    x[:, :, 6:14, 8:16] = 255
    return x


def _centroids(x: torch.Tensor) -> torch.Tensor:
    """(N, 2) centre of the pixels brighter than the middle of each image's range."""
    g = x.float().mean(1)
    lo, hi = g.amin((1, 2), keepdim=True), g.amax((1, 2), keepdim=True)
    w = (g > (lo + hi) / 2).float()
    ys, xs = torch.meshgrid(torch.arange(SIDE, dtype=torch.float32),
                            torch.arange(SIDE, dtype=torch.float32), indexing="ij")
    return torch.stack([(w * ys).sum((1, 2)), (w * xs).sum((1, 2))], 1) / w.sum((1, 2))[:, None]


def _albumentations(policy: str, x: torch.Tensor, *, hflip: bool = False) -> torch.Tensor:
    """The CPU path on the same images, as float NCHW in [0, 1]."""
    images = x.permute(0, 2, 3, 1).numpy()
    (out, _), = train_batches(images, np.zeros(len(x), np.int64), np.arange(len(x)),
                              batch_size=len(x), seed=0, prefetch=0,
                              transform=train_transform(policy, SIDE, hflip=hflip))
    return out.float() / 255


@pytest.mark.parametrize("policy", ["light", "strong"])
def test_batch_augment_keeps_shapes_and_range(policy):
    x = torch.from_numpy(_images(n=16)[0].copy()).permute(0, 3, 1, 2)
    out = batch_transform(policy, hflip=True)(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_nothing_to_do_is_none_on_both_paths():
    assert batch_transform("none") is None and train_transform("none", SIDE) is None
    with pytest.raises(ValueError, match="heavy"):
        batch_transform("heavy")


def test_flips_mirror_some_images_and_keep_the_others():
    x = torch.from_numpy(_images(n=32)[0].copy()).permute(0, 3, 1, 2)
    out = batch_transform("none", hflip=True)(x)
    plain = torch.isclose(out, x.float() / 255).flatten(1).all(1)
    mirrored = torch.isclose(out, x.flip(-1).float() / 255).flatten(1).all(1)
    assert bool((plain ^ mirrored).all())  # each image is one or the other
    assert 0 < int(mirrored.sum()) < 32


def test_affine_moves_content_as_albumentations_does():
    x = _square(256)
    start = _centroids(x[:1])
    moved = {name: (_centroids(out) - start).norm(dim=1) for name, out in (
        ("gpu", batch_transform("light")(x)), ("cpu", _albumentations("light", x)))}
    for name, shift in moved.items():
        assert 0.65 < float((shift > 0.5).float().mean()) < 0.9, name  # Affine's p = 0.8
        assert float(shift.max()) < 7.0, name  # ±10 % shift, 0.9-1.1 scale, ±10° of 32 px
    ratio = float(moved["gpu"].mean() / moved["cpu"].mean())
    assert 0.8 < ratio < 1.25


def test_brightness_and_colour_vary_as_albumentations_does():
    """The centre of a uniform colour image, away from the borders that shifts bring in."""
    x = torch.tensor([200, 90, 40], dtype=torch.uint8).view(1, 3, 1, 1).expand(512, 3, SIDE,
                                                                                SIDE)
    for policy in ("light", "strong"):
        out = {"gpu": batch_transform(policy)(x), "cpu": _albumentations(policy, x.contiguous())}
        centre = {k: v[:, :, 14:18, 14:18].mean((2, 3)) for k, v in out.items()}
        changed = {k: float(((c - x[0, :, 0, 0] / 255).abs().amax(1) > 0.02).float().mean())
                   for k, c in centre.items()}
        assert abs(changed["gpu"] - changed["cpu"]) < 0.1, (policy, changed)
        spread = {k: float((c[:, 0] - c[:, 2]).std()) for k, c in centre.items()}  # colour
        assert 0.67 < spread["gpu"] / spread["cpu"] < 1.5, (policy, spread)


def test_cutout_holes_appear_as_often_as_albumentations_makes_them():
    x = torch.full((1024, 3, SIDE, SIDE), 128, dtype=torch.uint8)
    inner = slice(9, 23)  # beyond the black borders an affine shift can bring in
    share = {}
    for name, out in (("gpu", batch_transform("strong")(x)), ("cpu", _albumentations("strong",
                                                                                      x))):
        share[name] = float((out[:, :, inner, inner] == 0).flatten(1).any(1).float().mean())
    assert share["gpu"] > 0.2 and abs(share["gpu"] - share["cpu"]) < 0.1, share


def test_each_image_of_a_batch_gets_its_own_parameters():
    out = batch_transform("light")(_square(32))
    distinct = {tuple(img.flatten()[::37].tolist()) for img in out}
    assert len(distinct) > 16


def test_same_seed_same_augmentation():
    x = torch.from_numpy(_images(n=16)[0].copy()).permute(0, 3, 1, 2)
    a, b = batch_transform("strong", hflip=True, seed=3), batch_transform("strong", hflip=True,
                                                                          seed=3)
    first = a(x)
    assert torch.equal(first, b(x))
    assert not torch.equal(first, a(x))  # the stream moves on
    a.set_random_seed(3)
    assert torch.equal(first, a(x))
    assert not torch.equal(first, batch_transform("strong", hflip=True, seed=4)(x))


# ---------------------------------------------------------------- in the training loop


@pytest.fixture
def tiny_inputs(make_folder) -> TrialInputs:
    data = load_data(make_folder(classes=3, per_class=8), image_size=32)
    split = draw_split(data.labels, val_fraction=0.25, test_fraction=0.15, seed=0,
                       class_names=data.class_names)
    return TrialInputs(data=data, init_state=initial_state("resnet10t", data.num_classes, seed=0),
                       train_idx=split.train, val_idx=split.val)


BASE = TrainConfig(model="resnet10t", epochs=2, batch_size=4, threads=1, amp="off",
                   augment="strong", hflip=True)


def _run(cfg: TrainConfig, inputs: TrialInputs) -> list[float]:
    reports: list[dict] = []
    fit(cfg, inputs, None, report=reports.append)
    return [r["train_loss"] for r in reports] + [r["val_loss"] for r in reports]


def test_fit_gives_the_same_result_with_more_loader_threads(tiny_inputs):
    one = _run(dataclasses.replace(BASE, loader_threads=1, prefetch=1), tiny_inputs)
    assert one == _run(dataclasses.replace(BASE, loader_threads=3, prefetch=2), tiny_inputs)
    assert one != _run(dataclasses.replace(BASE, seed=1), tiny_inputs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_cuda_augmentation_without_cuda_warns_and_augments_on_the_cpu(tiny_inputs):
    with pytest.warns(UserWarning, match="augment_device 'cuda'.*albumentations"):
        on_cuda = _run(dataclasses.replace(BASE, augment_device="cuda"), tiny_inputs)
    assert on_cuda == _run(BASE, tiny_inputs)
