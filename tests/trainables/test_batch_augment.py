"""Batched augmentation: its tensor kernels (the GPU path, checked here on CPU tensors) and its
OpenCV kernels (the host path) apply the same per-image parameters, and both vary images as the
albumentations policies they follow do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import every_way, upright_scenes
from trainables.augment import train_transform
from trainables.batch_augment import BatchAugment, batch_transform

SIDE = 32


def _draw(aug: BatchAugment, n: int, seed: int = 0):
    return aug.draw(n, SIDE, torch.Generator().manual_seed(seed))


def _tensor(policy: str, x: torch.Tensor, *, hflip: bool = False, seed: int = 0,
            dihedral: bool = False) -> torch.Tensor:
    aug = batch_transform(policy, hflip=hflip, dihedral=dihedral)
    return aug(x, _draw(aug, len(x), seed))


def _opencv(policy: str, x: torch.Tensor, *, hflip: bool = False, seed: int = 0,
            dihedral: bool = False) -> torch.Tensor:
    aug = batch_transform(policy, hflip=hflip, dihedral=dihedral)
    out = aug.apply_numpy(x.permute(0, 2, 3, 1).contiguous().numpy(), _draw(aug, len(x), seed))
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255


def _albumentations(policy: str, x: torch.Tensor, *, hflip: bool = False) -> torch.Tensor:
    """The albumentations pipeline the policies follow, image by image, as float NCHW."""
    transform = train_transform(policy, SIDE, hflip=hflip, seed=0)
    images = x.permute(0, 2, 3, 1).contiguous().numpy()
    out = np.stack([transform(image=im)["image"] for im in images])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255


def _images(n: int = 16, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)).permute(
        0, 3, 1, 2)


def _smooth(n: int) -> torch.Tensor:
    """Smooth colour images (bilinear resampling is near-exact on them)."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    base = np.stack([128 + 100 * np.sin(xx / 5), 128 + 100 * np.cos(yy / 7),
                     128 + 60 * np.sin((xx + yy) / 9)], -1).clip(0, 255).astype(np.uint8)
    return torch.from_numpy(np.stack([np.roll(base, k, 1) for k in range(n)])).permute(0, 3, 1, 2)


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


@pytest.mark.parametrize("policy, dihedral", [("none", False), ("light", False),
                                              ("strong", False), ("light", True)])
def test_the_tensor_and_the_opencv_kernels_agree(policy, dihedral):
    """One set of parameters, two implementations: the GPU's and the host's batches differ by
    uint8 rounding only (a wrong pixel convention would move whole images)."""
    x = _smooth(64)
    a = _tensor(policy, x, hflip=True, seed=5, dihedral=dihedral)
    b = _opencv(policy, x, hflip=True, seed=5, dihedral=dihedral)
    diff = (a - b).abs()
    assert a.shape == b.shape == x.shape and a.dtype == torch.float32
    assert float(diff.mean()) < 0.003 and float(diff.flatten().quantile(0.99)) < 0.01


@pytest.mark.parametrize("policy", ["light", "strong"])
def test_augmented_batches_keep_shapes_and_range(policy):
    out = _tensor(policy, _images(), hflip=True)
    assert out.shape == (16, 3, SIDE, SIDE) and 0.0 <= float(out.min()) <= float(out.max()) <= 1


def test_nothing_to_do_is_none():
    assert batch_transform("none") is None and train_transform("none", SIDE) is None
    with pytest.raises(ValueError, match="heavy"):
        batch_transform("heavy")


def test_flips_mirror_some_images_and_keep_the_others():
    x = _images(32)
    for out in (_tensor("none", x, hflip=True), _opencv("none", x, hflip=True)):
        plain = torch.isclose(out, x.float() / 255).flatten(1).all(1)
        mirrored = torch.isclose(out, x.flip(-1).float() / 255).flatten(1).all(1)
        assert bool((plain ^ mirrored).all())  # each image is one or the other
        assert 0 < int(mirrored.sum()) < 32


def test_dihedral_gives_each_image_one_of_the_eight_exact_symmetries():
    """Quarter turns and vertical flips copy pixels exactly, on both kernels, and every one of the
    8 symmetries of the square turns up."""
    x = _images(64)
    symmetries = [x.rot90(k, (2, 3)) for k in range(4)]
    symmetries += [s.flip(2) for s in symmetries]
    for out in (_tensor("none", x, dihedral=True), _opencv("none", x, dihedral=True)):
        which = torch.stack([(out * 255).round().to(torch.uint8).eq(s).flatten(1).all(1)
                             for s in symmetries], 1)
        assert bool(which.any(1).all())  # each image is exactly one of them
        assert bool(which.any(0).all())  # and each of them occurs
    assert batch_transform("none", dihedral=True) is not None
    assert train_transform("none", SIDE, dihedral=True) is not None


def test_affine_moves_content_as_albumentations_does():
    x = _square(256)
    start = _centroids(x[:1])
    moved = {name: (_centroids(out) - start).norm(dim=1) for name, out in (
        ("tensor", _tensor("light", x)), ("opencv", _opencv("light", x)),
        ("albumentations", _albumentations("light", x)))}
    for name, shift in moved.items():
        assert 0.65 < float((shift > 0.5).float().mean()) < 0.9, name  # Affine's p = 0.8
        assert float(shift.max()) < 7.0, name  # ±10 % shift, 0.9-1.1 scale, ±10° of 32 px
    for name in ("tensor", "opencv"):
        assert 0.8 < float(moved[name].mean() / moved["albumentations"].mean()) < 1.25, name


def test_brightness_and_colour_vary_as_albumentations_does():
    """The centre of a uniform colour image, away from the borders that shifts bring in."""
    x = torch.tensor([200, 90, 40], dtype=torch.uint8).view(1, 3, 1, 1).expand(
        512, 3, SIDE, SIDE).contiguous()
    for policy in ("light", "strong"):
        out = {"tensor": _tensor(policy, x), "albumentations": _albumentations(policy, x)}
        centre = {k: v[:, :, 14:18, 14:18].mean((2, 3)) for k, v in out.items()}
        changed = {k: float(((c - x[0, :, 0, 0] / 255).abs().amax(1) > 0.02).float().mean())
                   for k, c in centre.items()}
        assert abs(changed["tensor"] - changed["albumentations"]) < 0.1, (policy, changed)
        spread = {k: float((c[:, 0] - c[:, 2]).std()) for k, c in centre.items()}  # colour
        assert 0.67 < spread["tensor"] / spread["albumentations"] < 1.5, (policy, spread)


def test_cutout_holes_appear_as_often_as_albumentations_makes_them():
    x = torch.full((1024, 3, SIDE, SIDE), 128, dtype=torch.uint8)
    inner = slice(9, 23)  # beyond the black borders an affine shift can bring in
    share = {name: float((out[:, :, inner, inner] == 0).flatten(1).any(1).float().mean())
             for name, out in (("tensor", _tensor("strong", x)),
                               ("albumentations", _albumentations("strong", x)))}
    assert share["tensor"] > 0.2 and abs(share["tensor"] - share["albumentations"]) < 0.1, share


def test_each_image_gets_its_own_parameters_and_a_seed_fixes_them():
    aug = batch_transform("strong", hflip=True)
    out = aug(_square(32), _draw(aug, 32, seed=3))
    assert len({tuple(img.flatten()[::37].tolist()) for img in out}) > 16
    assert torch.equal(out, aug(_square(32), _draw(aug, 32, seed=3)))
    assert not torch.equal(out, aug(_square(32), _draw(aug, 32, seed=4)))


def test_a_batch_slice_of_the_epoch_draw_is_the_batch_s_parameters():
    """An epoch's parameters are drawn at once; the first rows of a longer draw equal a shorter
    draw, so a loader that knows only its batch's place gets the same numbers."""
    aug = batch_transform("strong", hflip=True)
    epoch, part = _draw(aug, 100, seed=9), _draw(aug, 40, seed=9)
    rows = epoch.rows(8, 16)
    assert torch.equal(rows.theta, part.theta[8:16]) and torch.equal(rows.holes,
                                                                     part.holes[8:16])


def test_orientation_tells_images_with_an_up_from_the_same_turned_every_way():
    from trainables.augment import orientation

    scenes = upright_scenes(60)
    turned = every_way(scenes)
    upright, free = orientation(scenes), orientation(turned)
    assert not upright["free"] and upright["gradients"] > 1.1  # furrows: more d/dy than d/dx
    assert free["free"] and abs(free["gradients"] - 1) < 0.01 and free["mean_turn"] < 0.01
    assert not orientation(np.concatenate([scenes] * 8 + [turned]))["free"]  # half upright
    assert not orientation(scenes[:, :, :20])["free"]  # not square: no quarter turns


@pytest.mark.skipif(not (Path(__file__).parents[3] / "shared" / "data").is_dir(),
                    reason="needs ../shared/data (blood-cells-small, clothing-small), which only "
                           "the project's own machines have")
def test_orientation_on_the_suite_blood_scans_have_no_up_clothing_photos_do():
    from trainables.augment import orientation
    from trainables.data import load_data

    data = Path(__file__).parents[3] / "shared" / "data"
    blood = load_data(data / "blood-cells-small" / "test", image_size=64)
    clothing = load_data(data / "clothing-small" / "test", image_size=64)
    assert orientation(blood.images)["free"] and not orientation(clothing.images)["free"]
