"""Smoke tests of the benchmarks: each main() runs for real with --quick and prints its ratios."""

from __future__ import annotations

import pytest

from benchmarks import data_path, ensemble_gain, overhead, scaling, search_efficiency, startup
from benchmarks.common import SIGNS

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


def test_search_efficiency_quick(make_folder, capsys) -> None:
    data = make_folder(classes=3, per_class=14)
    search_efficiency.main(["--data", str(data), "--budget-s", "12", "--seeds", "0",
                            "--image-size", "32", "--targets", "0.5", "1.01",
                            "--methods", "ours", "random", "sequential"])
    out = capsys.readouterr().out
    assert _has_header(out, "search efficiency")
    for method in ("ours", "random", "sequential"):
        assert f"seed 0 {method}: best val" in out and f"| {method} |" in out
    assert "never (0/1)" in out  # nothing reaches val accuracy 1.01
    assert "time to 0.5, ours / random:" in out


def test_ensemble_gain_quick(make_folder, capsys) -> None:
    data = make_folder(classes=3, per_class=14)
    ensemble_gain.main(["--data", str(data), "--seeds", "0", "--num-samples", "2", "--top", "2",
                        "--retrain-seeds", "0", "--image-size", "32"])
    out = capsys.readouterr().out
    assert _has_header(out, "ensemble gain")
    assert "search seed 0: best single" in out and "chosen on val:" in out
    for row in ensemble_gain.ROWS:
        assert f"| {row} |" in out


def test_scaling_quick(capsys) -> None:
    scaling.main(["--num-samples", "2", "--epochs", "1"])
    out = capsys.readouterr().out
    assert _has_header(out, "multi-node scaling")
    assert "1 node(s):" in out and "2 node(s):" in out and "trials ran on" in out
    assert "loop: 1 node" in out and "ratio" in out
