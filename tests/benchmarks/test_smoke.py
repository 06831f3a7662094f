"""Smoke tests of the benchmarks: each main() runs for real with --quick and prints its ratios."""

from __future__ import annotations

import pytest

from benchmarks import data_path, overhead, startup
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
