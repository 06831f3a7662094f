"""Augmentation of whole batches with tensor ops, on the device that trains: the `light` and
`strong` policies of `trainables.augment.train_transform`, every image with its own parameters.

A GPU trains a small model at tens of thousands of images/s; albumentations on a worker's CPU
threads cannot keep up, and per-image Python holds the GIL. Here every random parameter of an
epoch is drawn at once on the CPU from one seeded generator (`draw`) and copied to the device
once; a batch then only slices them (`Params.rows`) and applies a handful of batched kernels:

- geometry (flip, shift, scale, rotation, or with `dihedral` one of the 8 symmetries of the
  square in place of shift, scale and rotation) as one affine sampling grid per image
  (`affine_grid` + `grid_sample`; flips and quarter turns map pixel centres onto pixel centres,
  so they copy pixels exactly);
- every colour change (brightness/contrast, and for `strong` colour jitter) as one affine map
  of RGB per image, `x -> M x + v + u * mean_grey(x)`: brightness and contrast scale and shift,
  saturation mixes with the grey image, and hue turns colours about the grey axis (the YIQ
  rotation), clipped once at the end rather than after every step;
- blur as one depthwise 3x3 Gaussian per image (sigma 0 where an image is not blurred);
- cutout as 1-2 black boxes per image.

No step makes a host synchronisation, and a batch's result depends only on the seed, the epoch
and which images it holds: not on the device, the thread count or the batch's neighbours.
Ranges and probabilities follow the albumentations policies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainables.config import POLICIES

GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as albumentations' and torchvision's grayscale


def batch_transform(policy: str, *, hflip: bool = False, dihedral: bool = False
                    ) -> BatchAugment | None:
    """The batched counterpart of `train_transform(policy, ..., hflip=hflip,
    dihedral=dihedral)`, or None when that would be None (`policy='none'` without flips)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}")
    if policy == "none" and not hflip and not dihedral:
        return None
    return BatchAugment(policy, hflip=hflip, dihedral=dihedral)


@dataclass
class Params:
    """Per-image parameters of a run of images (rows): an epoch's, or a batch's slice of them."""

    theta: torch.Tensor  # (n, 2, 3) sampling grid of each output image (identity: untouched)
    colour: torch.Tensor  # (n, 3, 3) RGB map M
    shift: torch.Tensor  # (n, 2): v and u of M x + v + u * mean_grey(x)
    blur: torch.Tensor  # (n, 3) 1-D Gaussian taps ([0, 1, 0]: no blur)
    holes: torch.Tensor  # (n, 2, 4) cutout boxes (top, left, height, width) in pixels
    geometric: bool  # whether theta does anything at all (a policy without geometry skips it)

    def rows(self, start: int, stop: int) -> Params:
        return Params(self.theta[start:stop], self.colour[start:stop], self.shift[start:stop],
                      self.blur[start:stop], self.holes[start:stop], self.geometric)

    def to(self, device: torch.device) -> Params:
        """On `device`, copied without blocking (from page-locked memory when it is a GPU)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return Params(move(self.theta), move(self.colour), move(self.shift), move(self.blur),
                      move(self.holes), self.geometric)


class BatchAugment:
    """A policy's augmentation of uint8 NCHW batches, with per-image parameters from `draw`."""

    def __init__(self, policy: str, *, hflip: bool = False, dihedral: bool = False) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown augmentation policy {policy!r}")
        self.policy, self.hflip, self.dihedral = policy, hflip, dihedral
        self.light = policy in ("light", "strong")
        self.strong = policy == "strong"

    # ------------------------------------------------------------------ drawing, on the CPU

    def draw(self, n: int, side: int, generator: torch.Generator) -> Params:
        """The parameters of `n` images of `side` pixels, drawn in a fixed order from
        `generator` (so a seed gives the same parameters on any device)."""
        u = torch.rand(n, 26, generator=generator, dtype=torch.float64)
        theta = self._geometry(u[:, 0:6], side)
        if self.dihedral:  # drawn after the rest, so the other parameters stay as they were
            theta = _dihedral(torch.rand(n, 2, generator=generator, dtype=torch.float64)) @ theta
        colour, shift = self._colour(u[:, 6:14])
        blur = self._blur(u[:, 14:16])
        holes = self._holes(u[:, 16:26], side)
        return Params(theta.float(), colour.float(), shift.float(), blur.float(), holes.float(),
                      geometric=self.light or self.hflip or self.dihedral)

    def _geometry(self, u: torch.Tensor, side: int) -> torch.Tensor:
        """albumentations' HorizontalFlip(0.5) and Affine(translate ±10 %, scale 0.9-1.1,
        rotate ±10°, p=0.8), bilinear, black borders: the inverse map of each output pixel."""
        n = len(u)
        flip = (u[:, 0] < 0.5) if self.hflip else torch.zeros(n, dtype=torch.bool)
        # with the exact symmetries (`dihedral`), the policy's small affine jitter is left out
        on = (u[:, 1] < 0.8) if self.light and not self.dihedral else torch.zeros(
            n, dtype=torch.bool)
        angle = torch.deg2rad(_span(u[:, 2], -10, 10)) * on
        scale = torch.where(on, _span(u[:, 3], 0.9, 1.1), 1.0)
        # ±10 % of the side in whole pixels, rounded towards zero as albumentations does, then in
        # grid units (a side spans [-1, 1])
        shift = torch.trunc(_span(u[:, 4:6], -0.1, 0.1) * side) * (2 / side) * on[:, None]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
        theta = torch.cat([rot, -(rot @ shift[:, :, None])], -1)
        theta[:, :, 0] *= torch.where(flip, -1.0, 1.0)[:, None]  # read the mirrored column
        return theta

    def _colour(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RandomBrightnessContrast(0.2, 0.2, p=0.5) (x * alpha + beta) and, for `strong`,
        ColorJitter(0.3, 0.3, 0.3, 0.05, p=0.5) (brightness b, contrast c about the mean grey,
        saturation s towards the grey image, hue h) as one map per image:
        x -> b*alpha*c * H S x + b*beta + b*alpha*(1 - c) * mean_grey(x)."""
        n = len(u)
        eye = torch.eye(3, dtype=u.dtype).expand(n, 3, 3)
        if not self.light:
            return eye.clone(), torch.zeros(n, 2, dtype=u.dtype)
        bc = u[:, 0] < 0.5
        alpha = torch.where(bc, _span(u[:, 1], 0.8, 1.2), 1.0)
        beta = torch.where(bc, _span(u[:, 2], -0.2, 0.2), 0.0)
        on = (u[:, 3] < 0.5) & self.strong
        b, c, s = (torch.where(on, _span(u[:, k], 0.7, 1.3), 1.0) for k in (4, 5, 6))
        hue = torch.where(on, _span(u[:, 7], -0.05, 0.05), 0.0)
        grey = torch.tensor(GREY, dtype=u.dtype)
        sat = s[:, None, None] * eye + (1 - s)[:, None, None] * grey.expand(3, 3)[None]
        m = (b * alpha * c)[:, None, None] * (_hue_rotation(hue) @ sat)
        return m, torch.stack([b * beta, b * alpha * (1 - c)], 1)

    def _blur(self, u: torch.Tensor) -> torch.Tensor:
        """GaussianBlur(3x3, sigma 0.5-3, p=0.1) for `strong`: each image's 1-D taps."""
        n = len(u)
        on = (u[:, 0] < 0.1) & self.strong
        sigma = _span(u[:, 1], 0.5, 3.0)
        side = torch.exp(-1 / (2 * sigma**2))
        taps = torch.stack([side, torch.ones(n, dtype=u.dtype), side], 1)
        taps = taps / taps.sum(1, keepdim=True)
        none = torch.tensor([0.0, 1.0, 0.0], dtype=u.dtype).expand(n, 3)
        return torch.where(on[:, None], taps, none)

    def _holes(self, u: torch.Tensor, side: int) -> torch.Tensor:
        """CoarseDropout for `strong`: 1-2 black holes per image (p=0.5), each side between an
        eighth and a quarter of the image side; a hole of height 0 is no hole."""
        big = max(1, side // 4)
        on = (u[:, 0] < 0.5) & self.strong
        boxes = []
        for k, present in enumerate((on, on & (u[:, 1] < 0.5))):
            h, w, top, left = (u[:, 2 + 4 * k + j] for j in range(4))
            h, w = _whole(h, max(1, big // 2), big), _whole(w, max(1, big // 2), big)
            top, left = torch.floor(top * (side - h + 1)), torch.floor(left * (side - w + 1))
            boxes.append(torch.stack([top, left, h * present, w], 1))
        return torch.stack(boxes, 1)

    # ------------------------------------------------------------------ applying, on the device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        """uint8 NCHW -> float NCHW in [0, 1], on the batch's device; `p` holds its rows."""
        x = x.float().div_(255.0)
        if p.geometric:
            if self.light or self.dihedral:
                grid = F.affine_grid(p.theta, list(x.shape), align_corners=False)
                x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False)
            else:  # flips alone: a mirror, no resampling
                flip = (p.theta[:, 0, 0] < 0).view(-1, 1, 1, 1)
                x = torch.where(flip, x.flip(-1), x)
        if self.light:
            x = self._recolour(x, p)
        if self.strong:
            x = _blur(x, p.blur)
            x = _cutout(x, p.holes)
        return x

    def apply_numpy(self, x: np.ndarray, p: Params, out: np.ndarray | None = None) -> np.ndarray:
        """The same augmentation of a uint8 NHWC batch on the CPU with OpenCV, image by image in
        native code (its bilinear warp, colour map, Gaussian taps) and returned as uint8 NHWC:
        several times faster than albumentations' per-image Python, and what loader workers
        run. `p` holds the batch's rows (CPU tensors); results match `__call__` up to uint8
        rounding. `out`: where to write the batch (e.g. a slot of shared memory)."""
        import cv2

        n, side = len(x), x.shape[1]
        out = np.empty_like(x) if out is None else out
        theta = p.theta.numpy()
        flip_only = p.geometric and not self.light and not self.dihedral
        # the grid's inverse map in pixels (align_corners=False): p_in = A (p_out + 0.5 - s/2)
        # + (s/2)(b + 1) - 0.5, as cv2's WARP_INVERSE_MAP wants it
        half = side / 2
        mats = theta.copy()
        mats[:, :, 2] = (theta[:, :, :2].sum(-1) * (0.5 - half) + half * (theta[:, :, 2] + 1)
                         - 0.5)
        colour = self._colour_maps(x, p) if self.light else None
        taps, holes = p.blur.numpy(), p.holes.numpy().astype(int)
        for i in range(n):
            img = x[i]
            if flip_only:
                img = img[:, ::-1] if theta[i, 0, 0] < 0 else img
            elif p.geometric:
                img = cv2.warpAffine(img, mats[i], (side, side), flags=cv2.INTER_LINEAR
                                     | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
            if colour is not None:
                m = colour[i]
                if self.strong:  # the contrast term needs this image's mean grey
                    grey = float(np.dot(cv2.mean(img)[:3], GREY)) / 255.0
                    m = m.copy()
                    m[:, 3] += 255.0 * float(p.shift[i, 1]) * grey
                img = cv2.transform(img, m)
            if self.strong and taps[i, 1] < 1.0:
                img = cv2.sepFilter2D(img, -1, taps[i], taps[i],
                                      borderType=cv2.BORDER_REFLECT_101)
            out[i] = img
            for top, left, h, w in holes[i] if self.strong else ():
                if h > 0:
                    out[i, top:top + h, left:left + w] = 0
        return out

    def _colour_maps(self, x: np.ndarray, p: Params) -> np.ndarray:
        """(n, 3, 4) maps of 0-255 RGB: the colour map and its offset (the mean-grey term is
        added per image)."""
        m = np.zeros((len(x), 3, 4), np.float32)
        m[:, :, :3] = p.colour.numpy()
        m[:, :, 3] = 255.0 * p.shift[:, 0].numpy()[:, None]
        return m

    def _recolour(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        offset = p.shift[:, 0].view(-1, 1, 1, 1)
        if not self.strong:  # brightness and contrast only: M is alpha times the identity
            return torch.addcmul(offset, x, p.colour[:, 0, 0].view(-1, 1, 1, 1)).clamp_(0, 1)
        grey = torch.tensor(GREY, device=x.device, dtype=x.dtype)
        offset = offset + (p.shift[:, 1] * (x.mean((2, 3)) @ grey)).view(-1, 1, 1, 1)
        m = p.colour[:, :, :, None, None]  # (n, 3, 3, 1, 1): a 3x3 map per image
        y = torch.addcmul(offset, m[:, :, 0], x[:, 0:1])  # three multiply-adds beat a bmm
        y.addcmul_(m[:, :, 1], x[:, 1:2]).addcmul_(m[:, :, 2], x[:, 2:3])
        return y.clamp_(0.0, 1.0)


def _dihedral(u: torch.Tensor) -> torch.Tensor:
    """(n, 2, 2) maps of the image grid: one of the 8 symmetries of the square per image (a
    quarter turn k = 0-3 times, then a vertical flip or not), all equally likely. They move pixel
    centres onto pixel centres, so sampling through them copies pixels exactly."""
    k = torch.floor(u[:, 0] * 4).clamp_(max=3)
    cos = torch.round(torch.cos(k * math.pi / 2))
    sin = torch.round(torch.sin(k * math.pi / 2))
    flip = torch.where(u[:, 1] < 0.5, -1.0, 1.0).to(u.dtype)
    turn = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return turn @ torch.diag_embed(torch.stack([torch.ones_like(flip), flip], -1))


def _blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Each image convolved with its own separable 3x3 Gaussian (reflected borders), as
    multiply-adds of shifted views (a depthwise convolution of one kernel per image is slow on
    CPUs)."""
    t0, t1, t2 = (taps[:, k].view(-1, 1, 1, 1) for k in range(3))
    p = F.pad(x, (1, 1, 0, 0), mode="reflect")
    x = torch.addcmul(torch.addcmul(p[..., 1:-1] * t1, p[..., :-2], t0), p[..., 2:], t2)
    p = F.pad(x, (0, 0, 1, 1), mode="reflect")
    return torch.addcmul(torch.addcmul(p[..., 1:-1, :] * t1, p[..., :-2, :], t0),
                         p[..., 2:, :], t2)


def _cutout(x: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    _, _, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=holes.dtype).view(1, 1, -1, 1)
    xs = torch.arange(w, device=x.device, dtype=holes.dtype).view(1, 1, 1, -1)
    top, left, height, width = (holes[..., k, None, None] for k in range(4))
    inside = (ys >= top) & (ys < top + height) & (xs >= left) & (xs < left + width)
    return x.masked_fill(inside.any(1, keepdim=True), 0.0)


def _hue_rotation(hue: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) RGB maps turning hue by `hue` of a full turn about the grey axis (in YIQ)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                           [0.211, -0.523, 0.312]], dtype=hue.dtype)
    angle = 2 * math.pi * hue
    cos, sin = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(hue), torch.zeros_like(hue)
    turn = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, cos, -sin], -1),
                        torch.stack([zero, sin, cos], -1)], -2)
    return torch.linalg.inv(to_yiq) @ turn @ to_yiq


def _span(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Uniform numbers in [0, 1) stretched onto [low, high)."""
    return low + (high - low) * u


def _whole(u: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Uniform numbers in [0, 1) as whole numbers in [low, high]."""
    return (low + (u * (high - low + 1)).floor()).clamp_(max=high)
