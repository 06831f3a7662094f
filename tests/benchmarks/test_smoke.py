"""Smoke tests of the benchmarks: each main() runs for real with --quick and prints its ratios."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmarks import (
    cv_distill,
    data_path,
    ensemble_gain,
    overhead,
    scaling,
    search_efficiency,
    startup,
)
from benchmarks.common import REPO, SIGNS

pytestmark = pytest.mark.slow
needs_signs = pytest.mark.skipif(not SIGNS.is_dir(),
                                 reason="needs ../shared/data/sign-language-digits (the "
                                        "project's shared photos)")


def _has_header(out: str, name: str) -> bool:
    return f"# {name}" in out and "commit" in out and "repeats 1" in out


@pytest.mark.shared_data
@needs_signs
def test_overhead_quick(capsys) -> None:
    overhead.main(["--quick"])
    out = capsys.readouterr().out
    assert _has_header(out, "search overhead")
    assert "ratio ours_inline/bare " in out and "ours_ddp/bare " in out
    assert "| ours_inline |" in out and "| bare |" in out


def test_startup_quick(capsys) -> None:
    startup.main(["--quick"])
    out = capsys.readouterr().out
    assert _has_header(out, "trial start-up")
    assert "ratio ours_1w/plain " in out and "ours_2w/plain " in out
    assert "ours_1w first trial" in out


@pytest.mark.shared_data
@needs_signs
def test_data_path_quick(capsys) -> None:
    data_path.main(["--quick"])
    out = capsys.readouterr().out
    assert _has_header(out, "data path")
    assert "ratio loader/step " in out and "data_wait_share epochs 2..2 " in out


def test_data_path_loader_threads_quick(make_folder, capsys) -> None:
    data = make_folder(classes=3, per_class=14)
    data_path.main(["--quick", "--data", str(data), "--threads", "1", "2", "--loader-only"])
    out = capsys.readouterr().out
    assert _has_header(out, "data path") and "loader threads [1, 2]" in out
    assert "repeat 0: loader img/s 1 thread(s) " in out and ", 2 thread(s) " in out
    assert "ratio loader 2/1 threads " in out and "warpAffine alone 2/1 threads " in out
    assert "model step" not in out and "data_wait_share" not in out  # --loader-only


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without CUDA")
def test_gpu_without_cuda_says_so_and_exits_0() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs CUDA" in proc.stdout and "nothing measured" in proc.stdout


def test_search_efficiency_quick(make_folder, capsys) -> None:
    data = make_folder(classes=3, per_class=14)
    search_efficiency.main(["--data", str(data), "--budget-s", "30", "--seeds", "0",
                            "--image-size", "32", "--targets", "0.5", "1.01", "--max-epochs", "2",
                            "--methods", "ours", "random", "--space-kind", "wide"])
    out = capsys.readouterr().out
    assert _has_header(out, "search efficiency")
    for method in ("ours", "random"):
        assert f"seed 0 {method}: best val" in out and f"| {method} |" in out
    assert "never (0/1)" in out  # nothing reaches val accuracy 1.01
    assert "time to 0.5, ours / random:" in out


def test_ensemble_gain_quick(make_folder, capsys) -> None:
    data = make_folder(classes=3, per_class=14)
    ensemble_gain.main(["--data", str(data), "--seeds", "0", "--num-samples", "2", "--top", "2",
                        "--image-size", "32", "--max-epochs", "2", "--budget", "90",
                        "--keep-last", "2", "--init", "warm", "random"])
    out = capsys.readouterr().out
    assert _has_header(out, "ensemble gain")
    for init in ("warm", "random"):
        assert f"seed 0, init {init}: best single" in out and f"### init {init}" in out
    assert "warm start" in out and "chosen on val:" in out and "greedy soup took" in out
    for row in ensemble_gain.ROWS:
        assert f"| {row} |" in out


def test_cv_distill_quick(make_folder, capsys) -> None:
    data = make_folder(classes=3, per_class=14)
    cv_distill.main(["--quick", "--data", str(data)])
    out = capsys.readouterr().out
    assert _has_header(out, "cv, distillation and pseudo-labels")
    assert "$ python -m ensemble.build --experiment signs-0 --top 2 --folds 2" in out
    assert "$ python -m ensemble.distill --experiment half-0 --pseudo-label" in out
    for line in ("seed 0 cv: holdout top 2", "seed 0 distill: best single",
                 "seed 0 pseudo: ", "| CV weighted vote |", "| holdout weighted vote |",
                 "| CV (mean over folds) |", "| val (holdout) |", "| student |",
                 "| + pseudo-labels |", "share of the teacher's gap closed",
                 "with - without, test accuracy: "):
        assert line in out, line


def test_scaling_quick(capsys) -> None:
    scaling.main(["--num-samples", "2", "--epochs", "1"])
    out = capsys.readouterr().out
    assert _has_header(out, "multi-node scaling")
    assert "1 node(s):" in out and "2 node(s):" in out and "trials ran on" in out
    assert "loop: 1 node" in out and "ratio" in out
