"""Smoke tests of the search and ensemble benchmarks: each main() runs for real on a tiny
folder of images and prints its tables."""

from __future__ import annotations

import pytest

from benchmarks import (
    cv_distill,
    ensemble_gain,
    search_efficiency,
)
from conftest import has_header

pytestmark = pytest.mark.slow


def test_search_efficiency_quick(make_folder, capsys) -> None:
    data = make_folder(classes=3, per_class=14)
    # 3 trials end each search, not the budget: no outcome depends on the machine's speed
    search_efficiency.main(["--data", str(data), "--budget-s", "1800", "--trials", "3",
                            "--seeds", "0",
                            "--image-size", "32", "--targets", "0.5", "1.01", "--max-epochs", "2",
                            "--methods", "ours", "random", "--space-kind", "wide"])
    out = capsys.readouterr().out
    assert has_header(out, "search efficiency")
    for method in ("ours", "random"):
        assert f"seed 0 {method}: best val" in out and f"| {method} |" in out
    assert "never (0/1)" in out  # nothing reaches val accuracy 1.01
    assert "time to 0.5, ours / random:" in out
    assert "seed 0: both reached val" in out and "highest val both reached, ours / random" in out


def test_ensemble_gain_quick(make_folder, capsys, tmp_path) -> None:
    data = make_folder(classes=3, per_class=14)
    ensemble_gain.main(["--data", str(data), "--seeds", "0", "--num-samples", "2", "--top", "2",
                        "--image-size", "32", "--max-epochs", "2", "--budget", "30m",
                        "--keep-last", "2", "--init", "warm", "random",
                        "--keep", str(tmp_path / "kept")])
    out = capsys.readouterr().out
    assert has_header(out, "ensemble gain")
    for init in ("warm", "random"):
        assert f"seed 0, init {init}: best single" in out and f"### init {init}" in out
    assert "warm start" in out and "chosen on val:" in out and "greedy soup took" in out
    for row in ensemble_gain.ROWS:
        assert f"| {row} |" in out
    assert " trial(s), " in out and " snapshot(s))" in out
    kept = tmp_path / "kept"  # --keep: the searches and their ensembles are still there
    for init in ("warm", "random"):
        assert (kept / "runs" / f"gain-{init}-0" / "ensemble" / "report.json").is_file()
    assert (kept / "mlflow.db").is_file()


def test_cv_distill_quick(make_folder, capsys) -> None:
    data = make_folder(classes=3, per_class=14)
    cv_distill.main(["--quick", "--data", str(data)])
    out = capsys.readouterr().out
    assert has_header(out, "cv, distillation and pseudo-labels")
    assert "$ python -m ensemble.build --experiment signs-0 --top 2 --folds 2" in out
    assert "$ python -m ensemble.distill --experiment half-0 --pseudo-label" in out
    for line in ("seed 0 cv: holdout top 2", "seed 0 distill: best single",
                 "seed 0 pseudo: ", "| CV weighted vote |", "| holdout weighted vote |",
                 "| CV (mean over folds) |", "| val (holdout) |", "| student |",
                 "| + pseudo-labels |", "share of the teacher's gap closed",
                 "with - without, test accuracy: "):
        assert line in out, line
