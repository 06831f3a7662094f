"""Augmentation of whole batches on the training device: the `light` and `strong` policies of
`trainables.augment.train_transform`, for CUDA trials whose CPUs cannot augment fast enough.

A GPU trains a small model at tens of thousands of images/s; albumentations on a worker's few CPU
threads cannot keep up at that rate, while the same operations on a batch already on the GPU cost
little. torchvision.transforms.v2's transform classes draw one set of parameters per call, so on
a batch every image would get the same flip, shift and colour; here the parameters are drawn per
image and applied with torchvision's batched functional kernels (flip, grayscale, HSV, blur) and
torch's `affine_grid`/`grid_sample`. Each operation matches its albumentations counterpart's
ranges and probabilities.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as F
from torch import nn

# torchvision's own batched HSV conversion (what `adjust_hue` uses); `adjust_hue` itself takes
# one hue shift for the whole batch
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from trainables.config import POLICIES


def batch_transform(policy: str, *, hflip: bool = False, seed: int = 0) -> BatchAugment | None:
    """The batched counterpart of `train_transform(policy, ..., hflip=hflip)`, or None when that
    would be None (`policy='none'` without flips)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}")
    if policy == "none" and not hflip:
        return None
    return BatchAugment(policy, hflip=hflip, seed=seed)


class BatchAugment:
    """Augments a uint8 NCHW batch on its own device; every image gets its own parameters.

    Parameters are drawn on the CPU from one seeded generator and moved next to the batch, so a
    seed gives the same augmentation on a CPU (tests) as on a GPU, and no draw waits for the GPU.
    """

    def __init__(self, policy: str, *, hflip: bool = False, seed: int = 0) -> None:
        self.policy, self.hflip = policy, hflip
        self.generator = torch.Generator().manual_seed(seed)

    def set_random_seed(self, seed: int) -> None:
        """Restarts the random stream (named as albumentations' `Compose.set_random_seed`)."""
        self.generator.manual_seed(seed)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> float NCHW in [0, 1], on the batch's device."""
        x = F.to_dtype(x, torch.float32, scale=True)
        if self.hflip:
            x = self._flip(x)
        if self.policy in ("light", "strong"):
            x = self._affine(x, p=0.8)
            x = self._brightness_contrast(x, p=0.5)
        if self.policy == "strong":
            x = self._color_jitter(x, p=0.5)
            x = self._blur(x, p=0.1)
            x = self._cutout(x, p=0.5)
        return x

    def _draw(self, x: torch.Tensor, columns: int) -> torch.Tensor:
        """(N, columns) uniform numbers in [0, 1), one row per image, on the batch's device."""
        return torch.rand(len(x), columns, generator=self.generator).to(x.device)

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        on = self._draw(x, 1)[:, 0] < 0.5
        return torch.where(_per_image(on), F.horizontal_flip(x), x)

    def _affine(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """albumentations' Affine(translate ±10 %, scale 0.9-1.1, rotate ±10°), bilinear, black
        borders."""
        u = self._draw(x, 5)
        on = u[:, 0] < p
        angle = torch.deg2rad(_span(u[:, 1], -10, 10)) * on
        scale = torch.where(on, _span(u[:, 2], 0.9, 1.1), 1.0)
        # ±10 % of the side in whole pixels, rounded towards zero as albumentations does, then in
        # grid units (a side spans [-1, 1])
        sides = torch.tensor([x.shape[-1], x.shape[-2]], device=x.device)
        shift = torch.trunc(_span(u[:, 3:5], -0.1, 0.1) * sides) * (2 / sides) * on[:, None]
        # affine_grid maps each output pixel to where it samples the input: the inverse of
        # "rotate and scale about the centre, then shift" (square images: grid units are equal)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
        theta = torch.cat([rot, -(rot @ shift[:, :, None])], -1)
        grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                         align_corners=False)

    def _brightness_contrast(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """albumentations' RandomBrightnessContrast(0.2, 0.2): x * (1 ± 0.2) + (± 0.2)."""
        u = self._draw(x, 3)
        on = u[:, 0] < p
        alpha = torch.where(on, _span(u[:, 1], 0.8, 1.2), 1.0)
        beta = torch.where(on, _span(u[:, 2], -0.2, 0.2), 0.0)
        return (x * _per_image(alpha) + _per_image(beta)).clamp_(0, 1)

    def _color_jitter(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """albumentations' ColorJitter(0.3, 0.3, 0.3, 0.05) in a fixed order: brightness,
        contrast (towards the mean grey), saturation (towards the grey image), hue."""
        u = self._draw(x, 5)
        on = u[:, 0] < p
        bright, contrast, saturation = (_per_image(torch.where(on, _span(u[:, k], 0.7, 1.3), 1.0))
                                        for k in (1, 2, 3))
        hue = torch.where(on, _span(u[:, 4], -0.05, 0.05), 0.0)
        x = (x * bright).clamp_(0, 1)
        mean = F.rgb_to_grayscale(x).mean((-3, -2, -1), keepdim=True)
        x = (mean + contrast * (x - mean)).clamp_(0, 1)
        gray = F.rgb_to_grayscale(x)
        x = (gray + saturation * (x - gray)).clamp_(0, 1)
        h, s, v = _rgb_to_hsv(x).unbind(-3)
        return _hsv_to_rgb(torch.stack(((h + hue.view(-1, 1, 1)).remainder(1.0), s, v), -3))

    def _blur(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """albumentations' GaussianBlur(3x3, sigma 0.5-3) on a random share p of the images; one
        sigma per batch (torchvision's kernel takes one)."""
        on = self._draw(x, 1)[:, 0] < p
        sigma = float(_span(torch.rand((), generator=self.generator), 0.5, 3.0))
        return torch.where(_per_image(on), F.gaussian_blur(x, [3, 3], [sigma, sigma]), x)

    def _cutout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """albumentations' CoarseDropout: 1-2 black holes per image, each side between an eighth
        and a quarter of the image side."""
        n, _, height, width = x.shape
        big = max(1, height // 4)
        u = self._draw(x, 10)
        ys = torch.arange(height, device=x.device).view(1, -1, 1)
        xs = torch.arange(width, device=x.device).view(1, 1, -1)
        holes = torch.zeros(n, height, width, dtype=torch.bool, device=x.device)
        for k, on in enumerate((u[:, 0] < p, (u[:, 0] < p) & (u[:, 1] < 0.5))):
            h, w, top, left = (u[:, 2 + 4 * k + j].view(-1, 1, 1) for j in range(4))
            h, w = _whole(h, max(1, big // 2), big), _whole(w, max(1, big // 2), big)
            top, left = (top * (height - h + 1)).floor(), (left * (width - w + 1)).floor()
            holes |= (on.view(-1, 1, 1) & (ys >= top) & (ys < top + h)
                      & (xs >= left) & (xs < left + w))
        return x.masked_fill(holes[:, None], 0.0)


def _span(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Uniform numbers in [0, 1) stretched onto [low, high)."""
    return low + (high - low) * u


def _whole(u: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Uniform numbers in [0, 1) as whole numbers in [low, high]."""
    return (low + (u * (high - low + 1)).floor()).clamp_(max=high).long()


def _per_image(v: torch.Tensor) -> torch.Tensor:
    """One value per image, broadcast over (C, H, W)."""
    return v.view(-1, 1, 1, 1)
