"""Data that does not fit: decoded once into the decoded cache, streamed to the trials.

The search runs on a real Ray whose object store (80 MB) is a third of the decoded data, so the
in-memory path could not even put the data; `--data-path auto` must choose the stream itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, read_results

pytestmark = pytest.mark.slow

SIDE = 128
STORE = 80 * 2**20  # about the smallest object store Ray accepts
N_IMAGES = 4 * STORE // (SIDE * SIDE * 3)  # decoded: 4x the store

# a small, fast network for 128 px images (a stride-8 stem), so the test spends its time on the
# data path rather than on convolutions
NET = '''
import torch
from torch import nn
from timm.models import register_model


class StreamNet(nn.Module):
    def __init__(self, num_classes=10, drop_rate=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.BatchNorm2d(16),
                                      nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(32, num_classes)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.fc(self.drop(self.features(x)))


@register_model
def stream_net(pretrained=False, num_classes=10, drop_rate=0.0, **kwargs):
    return StreamNet(num_classes, drop_rate)
'''


def _jpegs(root: Path, n: int) -> Path:
    """n JPEGs of 3 classes, each a noisy picture with its class's bright square."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 80, (SIDE, SIDE, 3), dtype=np.uint8)
    q = SIDE // 3
    for i in range(n):
        k = i % 3
        img = np.roll(base, int(rng.integers(0, SIDE)), axis=1)
        img[k * q:(k + 1) * q, k * q:(k + 1) * q, k] = 255
        path = root / f"c{k}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=85)
    return root


@pytest.fixture
def small_store_cluster(tmp_path, monkeypatch):
    """A real Ray with an 80 MB object store; its workers can import the test's network."""
    from ray.cluster_utils import Cluster

    (tmp_path / "stream_nets.py").write_text(NET)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(tmp_path)]))
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2,
                                                      "object_store_memory": STORE})
    yield c
    c.shutdown()


def _run(module: str, args: list[str], cwd: Path, address: str):
    env = {**os.environ, "RAY_ADDRESS": address}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_a_search_on_data_three_times_the_object_store_streams_it(small_store_cluster,
                                                                  tmp_path):
    data = _jpegs(tmp_path / "images", N_IMAGES)
    storage = tmp_path / "runs"
    decoded = N_IMAGES * SIDE * SIDE * 3
    args = ["--data", str(data), "--image-size", str(SIDE), "--model", "stream_net",
            "--plugins", "stream_nets", "--num-samples", "2", "--max-epochs", "1",
            "--space", "batch_size=[64]", "--init", "random", "--no-refit",
            "--storage", str(storage), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    proc = _run("search.run", args, tmp_path, small_store_cluster.address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data path: stream" in proc.stderr  # chosen, not forced
    exp = storage / "default"
    with np.load(exp / "data.npz") as z:  # the experiment names its cache, holds no images
        assert "images" not in z.files
        cache = Path(str(z["images_file"]))
    assert cache.stat().st_size > decoded and (exp / "data.npz").stat().st_size < 2**20
    table = read_results(exp / "results.csv")
    assert list(table["status"]) == ["completed"] * 2
    for tid in table["trial_id"]:  # no trial process took the data into its memory
        epochs = [json.loads(line) for line in
                  (exp / "ray" / f"trial_{tid}" / "result.json").read_text().splitlines()]
        # what a trial holds beyond its first update (the libraries a step loads, the model's
        # state, a batch): more batches, not the data. The in-memory path maps the data and
        # touches every image of it: its peak grows by at least the train part. (Counted from
        # before the first batch, the libraries and the first step alone took ~150 MB of 160.)
        grew = max(e["peak_memory_mb"] for e in epochs) - epochs[0]["warm_memory_mb"]
        assert grew * 2**20 < decoded / 2, (tid, grew)

    more = _run("search.run", args + ["--extend", "1"], tmp_path, small_store_cluster.address)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "px into" not in more.stderr  # the cache is read again, not decoded again
    assert len(read_results(exp / "results.csv")) == 3

    built = _run("ensemble.build", ["--storage", str(storage), "--top", "2", "--tracking-uri",
                                    f"sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path,
                 small_store_cluster.address)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (exp / "ensemble" / "ensemble.pt").is_file()
