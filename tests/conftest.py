"""Shared fixtures: real image files written per test, and a real local Ray per session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # with `pytest -n 2` each worker's Ray clusters live in their own temp dir: a plain
    # ray.init() (every search run) joins the cluster named in <temp>/ray/ray_current_cluster,
    # which a multi-node test's Cluster writes, so a shared dir would mix the workers' clusters
    os.environ.setdefault("RAY_TMPDIR", f"/tmp/ray-{os.environ['PYTEST_XDIST_WORKER']}")
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "sign-language-digits" / "images"


def write_image(path: Path, cls: int, rng: np.random.Generator, size: int = 24,
                fmt: str | None = None) -> None:
    """A small RGB image whose class is visible: a bright square at a class-specific spot."""
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    q = size // 3
    r, c = divmod(cls % 9, 3)
    img[r * q:(r + 1) * q, c * q:(c + 1) * q, cls % 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format=fmt)


def image_folder(root: Path, classes: int = 3, per_class: int = 14, seed: int = 0) -> Path:
    """`root` filled with class folders c0, c1, ... of PNGs (for module-scoped searches, which
    cannot use the function-scoped `make_folder`)."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        for i in range(per_class):
            write_image(root / f"c{k}" / f"{i}.png", k, rng)
    return root


@pytest.fixture
def make_folder(tmp_path: Path):
    """make_folder(classes=3, per_class=8, root=None) -> a folder of class folders of PNG/JPEGs."""

    def make(classes: int = 3, per_class: int = 8, root: Path | None = None,
             seed: int = 0) -> Path:
        root = root or tmp_path / "images"
        rng = np.random.default_rng(seed)
        for k in range(classes):
            for i in range(per_class):
                suffix = ".png" if i % 2 else ".jpg"
                write_image(root / f"class_{k}" / f"img_{i}{suffix}", k, rng)
        return root

    return make


@pytest.fixture
def make_csv(tmp_path: Path):
    """make_csv(classes=3, per_class=8) -> a CSV (image_path, target) beside its images."""

    def make(classes: int = 3, per_class: int = 8, image_col: str = "image_path",
             label_col: str = "target") -> Path:
        rng = np.random.default_rng(1)
        root = tmp_path / "csvdata"
        rows = [f"{image_col},{label_col}"]
        for k in range(classes):
            for i in range(per_class):
                rel = f"files/{k}_{i}.png"
                write_image(root / rel, k, rng)
                rows.append(f"{rel},label_{k}")
        path = root / "train.csv"
        path.write_text("\n".join(rows) + "\n")
        return path

    return make


def has_header(out: str, name: str) -> bool:
    """Whether a benchmark's output starts with its header (name, commit, repeats 1)."""
    return f"# {name}" in out and "commit" in out and "repeats 1" in out


def run_module(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m module args` in `cwd` as a user runs it, the output captured."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=600)


def start_search(args: list[str], cwd: Path) -> subprocess.Popen:
    """Starts `python -m search.run` as a terminal would, so a SIGINT sent to it is a Ctrl+C:
    a suite run as a background job (`... &`, nohup) ignores SIGINT and its children inherit
    that, so the child's SIGINT is set back to its default first."""
    return subprocess.Popen([sys.executable, "-m", "search.run", *args], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def read_results(path) -> pd.DataFrame:
    """A search's results.csv (or pareto.csv) with trial ids as text, as the product reads it: a
    hex id of digits only ('22492228') would otherwise become a number and match nothing."""
    return pd.read_csv(path, dtype={"trial_id": str})


def upright_scenes(n: int, side: int = 32, seed: int = 0) -> np.ndarray:
    """(n, side, side, 3) uint8 'photos' with an up: a bright sky over darker ground with
    horizontal furrows, each at its own horizon and brightness."""
    rng = np.random.default_rng(seed)
    yy = np.mgrid[0:side, 0:side][0]
    out = []
    for _ in range(n):
        horizon = rng.integers(side // 3, 2 * side // 3)
        ground = 80 + 40 * rng.random() + 30 * np.sin(yy / 1.5 + rng.random() * 6)
        grey = np.where(yy < horizon, 200 + 30 * rng.random(), ground)
        grey = grey + rng.normal(0, 4, (side, side))
        out.append(np.repeat(grey.clip(0, 255)[..., None], 3, -1))
    return np.stack(out).astype(np.uint8)


def every_way(images: np.ndarray) -> np.ndarray:
    """Each image in all 8 orientations of the square: a set without an up or down."""
    return np.concatenate([np.rot90(s, k, (1, 2)) for s in (images, images[:, ::-1])
                           for k in range(4)])
