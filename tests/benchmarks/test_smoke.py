"""Smoke tests of the speed benchmarks: each main() runs for real with --quick and prints its
ratios. (The search and ensemble benchmarks are in test_smoke_searches.py, a module of its own
so that `pytest -n 2` can run the two halves side by side.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import (
    data_path,
    overhead,
    scaling,
    startup,
)
from benchmarks.common import REPO, SIGNS
from conftest import has_header

pytestmark = pytest.mark.slow
needs_signs = pytest.mark.skipif(not SIGNS.is_dir(),
                                 reason="needs ../shared/data/sign-language-digits (the "
                                        "project's shared photos)")


@pytest.mark.shared_data
@needs_signs
def test_overhead_quick(capsys) -> None:
    overhead.main(["--quick"])
    out = capsys.readouterr().out
    assert has_header(out, "search overhead")
    assert "ratio ours_inline/bare " in out and "ours_ddp/bare " in out
    assert "| ours_inline |" in out and "| bare |" in out


def test_startup_quick(capsys) -> None:
    startup.main(["--quick"])
    out = capsys.readouterr().out
    assert has_header(out, "trial start-up")
    assert "ratio ours_1w/plain " in out and "ours_2w/plain " in out
    assert "ours_1w first trial" in out


@pytest.mark.shared_data
@needs_signs
def test_data_path_quick(capsys) -> None:
    data_path.main(["--quick"])
    out = capsys.readouterr().out
    assert has_header(out, "data path")
    assert "ratio loader/step " in out and "data_wait_share epochs 2..2 " in out


def test_data_path_loader_workers_quick(make_folder, capsys) -> None:
    data = make_folder(classes=3, per_class=14)
    data_path.main(["--quick", "--data", str(data), "--workers", "1", "2", "--loader-only"])
    out = capsys.readouterr().out
    assert has_header(out, "data path") and "loader workers [1, 2]" in out
    assert "repeat 0: loader img/s 1 worker(s) " in out and ", 2 worker(s) " in out
    assert "ratio loader 2/1 workers " in out and "warpAffine alone 2/1 threads " in out
    assert "model step" not in out and "data_wait_share" not in out  # --loader-only


def test_data_path_engines_quick(make_folder, capsys) -> None:
    data = make_folder(classes=3, per_class=14)
    data_path.main(["--quick", "--data", str(data), "--workers", "1", "--engines"])
    out = capsys.readouterr().out
    assert has_header(out, "augmentation engines on the CPU")
    assert "repeat 0: 1 thread(s): OpenCV " in out and ", tensor kernels " in out
    assert "\n1 thread(s): OpenCV " in out and "; tensor / OpenCV " in out  # the summary
    assert "loader img/s" not in out and "model step" not in out  # the engines only


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without CUDA")
def test_gpu_without_cuda_says_so_and_exits_0() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs CUDA" in proc.stdout and "nothing measured" in proc.stdout


def test_scaling_quick(capsys) -> None:
    scaling.main(["--num-samples", "2", "--epochs", "1"])
    out = capsys.readouterr().out
    assert has_header(out, "multi-node scaling")
    assert "1 node(s):" in out and "2 node(s):" in out and "trials ran on" in out
    assert "loop: 1 node" in out and "ratio" in out


def test_vs_script_table_from_kept_runs(tmp_path, capsys) -> None:
    """--table prints the suite's table from kept runs.jsonl files without running anything: one
    run per dataset, seed and K (a later line replaces an earlier one), errors relative to the
    script's own."""
    from benchmarks import vs_script

    def run(data, seed, k, script_acc, final_acc):
        test = {"accuracy": final_acc, "f1": final_acc, "loss": 0.5}
        return json.dumps({"data": data, "seed": seed, "k": k, "budget_s": 100.0 * k,
                           "script": {"acc": script_acc, "f1": script_acc, "s": 100.0},
                           "product": {"final": test, "ensemble": test, "chosen": "refit",
                                       "total_s": 90.0 * k}})

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join([run("blood", 0, 4, 0.9, 0.5), run("blood", 1, 4, 0.9, 0.95),
                                run("signs", 0, 1, 0.8, 0.8)]) + "\n")
    second.write_text(run("blood", 0, 4, 0.9, 0.95) + "\n" + run("blood", 0, 2, 0.9, 0.91) + "\n")
    vs_script.main(["--table", str(first), str(second)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[:2] for r in rows[1:]] == [["| blood", "2"], ["| blood", "4"],
                                                      ["| signs", "1"]]
    assert "| 0.5000 ± 0.0000 |" in rows[2]  # both blood K=4 seeds at half the script's errors
    with pytest.raises(SystemExit, match="runs.jsonl"):
        vs_script.main(["--table", str(tmp_path / "missing.jsonl")])
