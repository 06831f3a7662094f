"""The search on real photos: ../shared/data/sign-language-digits (absent in a user's clone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA, read_results

pytestmark = [pytest.mark.slow, pytest.mark.shared_data,
              pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                 reason="needs ../shared/data/sign-language-digits/images, "
                                        "which only the project's own machines have")]


def test_search_on_sign_language_photos(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "search.run", "--data", str(SHARED_DATA), "--image-size", "32",
         "--num-samples", "2", "--max-epochs", "2", "--space", "epochs=2",
         "--space", "lr=0.003", "--space", "scheduler=cosine", "--experiment", "signs",
         "--init", "random", "--no-refit",
         "--storage", str(tmp_path / "runs"), "--tracking-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}", "--num-cpus", "2"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / "runs" / "signs"
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["data"]["num_images"] == 2062 and summary["data"]["num_classes"] == 10
    assert summary["test"]["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert len(read_results(exp / "results.csv")) == 2
