"""The model report's parts: confused pairs, the loss ranking, Grad-CAM where the evidence is."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from models.explain import confused_pairs, ensemble_cam, grad_cam, losses, model_report
from trainables.models import create_model


class ColourNet(nn.Module):
    """A network whose class k is the mean of colour channel k (red, green) of a 4x-pooled
    feature map: its Grad-CAM for a class must light up that colour's patch, not the other."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.pool(x) * self.scale)[:, :2].mean((2, 3))


class TokenNet(nn.Module):
    """Features as tokens (N, L, C), like a vision transformer: no spatial map."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(2).transpose(1, 2)).mean(1)


MEAN, STD = [0.0] * 3, [1.0] * 3


def test_grad_cam_lights_up_the_evidence_of_each_class():
    img = np.full((32, 32, 3), 20, np.uint8)
    img[2:10, 22:30, 0] = 250  # red, top right: class 0
    img[22:30, 2:10, 1] = 250  # green, bottom left: class 1
    cam = grad_cam(ColourNet(), np.stack([img, img]), np.array([0, 1]), mean=MEAN, std=STD)
    assert cam.shape == (2, 32, 32) and cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    for k, (rows, cols) in enumerate(((slice(0, 12), slice(20, 32)),
                                      (slice(20, 32), slice(0, 12)))):
        r, c = np.unravel_index(cam[k].argmax(), cam[k].shape)
        assert rows.start <= r < rows.stop and cols.start <= c < cols.stop  # not transposed
        other = cam[1 - k][rows, cols].mean()
        assert cam[k][rows, cols].mean() > 4 * other  # the other class's map stays dark here
    assert grad_cam(TokenNet(), np.stack([img]), np.array([0]), mean=MEAN, std=STD) is None


def test_grad_cam_runs_on_a_timm_network_and_a_vote_averages_members():
    torch.manual_seed(0)
    net = create_model("resnet10t", 3)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    ckpt = SimpleNamespace(mean=[0.5] * 3, std=[0.25] * 3)  # what a Checkpoint carries
    one = grad_cam(net, images, np.array([0, 1, 2]), mean=ckpt.mean, std=ckpt.std)
    assert one.shape == (3, 32, 32) and np.isfinite(one).all() and one.max() <= 1.0 + 1e-6
    other = ColourNet(), SimpleNamespace(mean=MEAN, std=STD)
    mixed = ensemble_cam([(net, ckpt), other], [3.0, 1.0], images, np.array([1, 1, 1]))
    parts = [grad_cam(m, images, np.array([1, 1, 1]), mean=c.mean, std=c.std)
             for m, c in ((net, ckpt), other)]
    assert np.allclose(mixed, (3 * parts[0] + parts[1]) / 4, atol=1e-6)
    assert ensemble_cam([(TokenNet(), ckpt)], [1.0], images, np.array([0, 0, 0])) is None


def test_confused_pairs_and_losses():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([1, 1, 0, 1, 2, 0, 0, 0, 2])
    probs = np.full((9, 3), 0.1)
    probs[np.arange(9), pred] = 0.8
    pairs = confused_pairs(probs, labels, ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == \
        [("c", "a", 3), ("a", "b", 2), ("b", "c", 1)]
    assert pairs[0]["share_of_true"] == 0.75
    loss = losses(probs, labels)
    assert loss[0] == pytest.approx(-np.log(0.1)) and loss[2] == pytest.approx(-np.log(0.8))


def test_model_report_writes_the_gallery_and_ranks_by_loss(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(20) % 2
    probs = np.full((20, 2), 0.5)
    probs[:, 1] = np.linspace(0.05, 0.95, 20)
    probs[:, 0] = 1 - probs[:, 1]
    doc = model_report([(ColourNet(), SimpleNamespace(mean=MEAN, std=STD))], [1.0], probs, images,
                       labels, ["zero", "one"], [f"img{i}" for i in range(20)], tmp_path, "t")
    worst = doc["highest_loss"]
    assert worst[0]["id"] == "img1" and worst[0]["true"] == "one"  # p(one) = 0.097: the worst
    assert [w["loss"] for w in worst] == sorted((w["loss"] for w in worst), reverse=True)
    assert doc["val_errors"] == 10 and doc["gradcam"] is True
    assert json.loads((tmp_path / "report.json").read_text())["confused_pairs"][0]["count"] == 5
    for name in ("errors.png", "gradcam.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 500
