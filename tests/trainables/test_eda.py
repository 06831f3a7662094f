"""The data report on real image files with planted problems: duplicates (also across split
parts and across labels), a corrupt file, a grey and a non-square image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, write_image
from trainables.eda import data_report, findings, main, split_parts


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """train/ and test/ folders of 3 classes, then: a train image copied into test/ (a leak),
    a c0 image copied into c1 (same content, other label), a truncated PNG, a grey image and a
    wide image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for part, n in (("train", 6), ("test", 2)):
        for k in range(3):
            for i in range(n):
                write_image(root / part / f"c{k}" / f"{i}.png", k, rng)
    shutil.copy(root / "train/c2/0.png", root / "test/c2/leak.png")
    shutil.copy(root / "train/c0/1.png", root / "train/c1/relabelled.png")
    good = (root / "train/c0/2.png").read_bytes()
    (root / "train/c0/corrupt.png").write_bytes(good[: len(good) // 2])
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(root / "train/c1/g.png")
    Image.fromarray(rng.integers(0, 255, (10, 30, 3), dtype=np.uint8)).save(
        root / "train/c2/wide.jpg")
    return root


def test_report_finds_planted_duplicates_and_the_corrupt_file(planted, tmp_path):
    doc = data_report(planted, tmp_path / "report")
    assert [u["id"] for u in doc["unreadable"]] == ["train/c0/corrupt.png"]
    assert doc["num_files"] == 24 + 5 and doc["num_readable"] == 28
    assert doc["class_counts"] == {"c0": 8, "c1": 10, "c2": 10}
    assert doc["duplicate_files"] == 2
    leak = {(f["id"], f["part"]) for f in doc["cross_split"][0]}
    assert len(doc["cross_split"]) == 1
    assert leak == {("train/c2/0.png", "train"), ("test/c2/leak.png", "test")}
    assert len(doc["conflicting_labels"]) == 1
    assert {f["label"] for f in doc["conflicting_labels"][0]} == {"c0", "c1"}
    assert doc["modes"] == {"RGB": 27, "L": 1}
    assert doc["aspect_bins"]["square"] == 27 and doc["aspect_bins"][">2"] == 1
    assert doc["width"]["max"] == 30 and doc["height"]["min"] == 10
    notes = findings(doc)
    assert "inflated" in notes[0] and any("do not decode" in n for n in notes)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "test/c2/leak.png" in md and "train/c0/corrupt.png" in md
    for name in ("samples.png", "overview.png"):
        assert Image.open(tmp_path / "report" / name).size[0] > 300


def test_split_of_a_search_marks_leaks_in_a_plain_folder(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "flat"
    for k in range(2):
        for i in range(4):
            write_image(root / f"c{k}" / f"{i}.png", k, rng)
    shutil.copy(root / "c0/0.png", root / "c0/copy.png")
    split = {"ids": {"train": ["c0/0.png", "c0/1.png"], "val": ["c0/copy.png"], "test": []}}
    plain = data_report(root, tmp_path / "a")
    assert plain["duplicate_files"] == 1 and plain["cross_split"] == []  # no parts known
    doc = data_report(root, tmp_path / "b", parts=split_parts(split))
    assert [sorted(f["part"] for f in g) for g in doc["cross_split"]] == [["train", "val"]]


def test_csv_source_and_the_builtin_digits(tmp_path, make_csv):
    doc = data_report(make_csv(classes=2, per_class=3), tmp_path / "csv")
    assert doc["class_counts"] == {"label_0": 3, "label_1": 3} and not doc["unreadable"]
    digits = data_report(None, tmp_path / "digits")
    assert digits["num_files"] == 1797 and digits["num_classes"] == 10
    assert digits["width"]["max"] == 8 and digits["modes"] == {"L": 1797}


def _eda(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainables.eda", *args], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)


def test_command_line_writes_the_report_and_names_mistakes(planted, tmp_path, capsys):
    proc = _eda([str(planted), "--out", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "inflated" in proc.stdout
    assert json.loads((tmp_path / "out" / "report.json").read_text())["duplicate_files"] == 2
    for args in ([str(tmp_path / "missing")], [str(planted), "--split", "nope.json"]):
        assert main([*args, "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.strip().count("\n") == 0, err
        assert args[-1] in err
    assert not (tmp_path / "never").exists()
