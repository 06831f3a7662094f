"""The Optuna study behind a search: pictures and the Pareto front from a real study in a real
sqlite file (no training), and end to end: two architectures, each from its own start, searched
for accuracy against measured latency."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import optuna
import pandas as pd
import pytest

from conftest import REPO, read_results, write_image
from search.config import parse_config
from search.resume import STUDY, study_storage
from search.study import draw, pareto_front
from trainables.store import ExperimentStore

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(store: ExperimentStore, directions: list[str], values: list) -> None:
    store.dir.mkdir(parents=True)
    study = optuna.create_study(study_name=STUDY, storage=study_storage(store),
                                directions=directions)
    for i, v in enumerate(values):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
                           "batch_size": optuna.distributions.CategoricalDistribution([32, 64])})
        trial.set_user_attr("trial_id", f"t{i}")
        study.tell(trial, v)


def test_pictures_of_a_real_study(tmp_path):
    store = ExperimentStore(tmp_path / "exp")
    _study(store, ["maximize"], [0.5, 0.7, 0.6, 0.8, 0.75, 0.65])
    written = draw(parse_config([]), store)
    names = {p.name for p in written}
    assert {"optimization_history.png", "param_importances.png",
            "parallel_coordinate.png"} <= names
    assert all(p.stat().st_size > 5000 for p in written)


def test_the_pareto_front_is_read_back_from_the_study(tmp_path):
    store = ExperimentStore(tmp_path / "exp")
    # (accuracy, ms per image): t1 and t3 are dominated by t0 / t2
    _study(store, ["maximize", "minimize"], [[0.9, 2.0], [0.8, 3.0], [0.7, 0.5], [0.6, 0.9]])
    store.write_results(pd.DataFrame({"trial_id": [f"t{i}" for i in range(4)],
                                      "status": "completed", "checkpoint": "",
                                      "best_val_acc": [0.9, 0.8, 0.7, 0.6]}))
    cfg = parse_config(["--objective", "accuracy,latency"])
    front = pareto_front(cfg, store)
    assert sorted(front["trial_id"]) == ["t0", "t2"]
    saved = pd.read_csv(store.path("pareto.csv"))
    assert list(saved["latency_ms"]) == [0.5, 2.0]  # cheapest first
    assert pareto_front(parse_config([]), store) is None  # single objective: no front


@pytest.mark.slow
def test_two_architectures_searched_for_accuracy_against_latency(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(3):
        for i in range(12):
            write_image(tmp_path / "images" / f"c{k}" / f"{i}.png", k, rng)
    proc = subprocess.run(
        [sys.executable, "-m", "search.run", "--data", str(tmp_path / "images"),
         "--image-size", "32", "--num-samples", "4", "--max-epochs", "1", "--no-refit",
         "--warm-epochs", "1", "--space", "model=[resnet10t, mobilenetv3_small_050]",
         "--space", "by_model={mobilenetv3_small_050: {lr: [0.005]}}",
         "--objective", "accuracy,latency", "--num-cpus", "2", "--experiment", "archs",
         "--storage", str(tmp_path / "runs"), "--tracking-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from trainables.checkpoint import Checkpoint
    from trainables.start import Start

    exp = tmp_path / "runs" / "archs"
    starts = {m: Start.load(exp / f).id
              for m, f in (("resnet10t", "init.pt"),
                           ("mobilenetv3_small_050", "init-mobilenetv3_small_050.pt"))}
    assert Start.load(exp / "init-mobilenetv3_small_050.pt").kind == "warm"
    table = read_results(exp / "results.csv")
    for row in table.itertuples():
        ckpt = Checkpoint.load(exp / row.checkpoint)
        assert ckpt.init_id == starts[row.model]  # each from its own architecture's start
        if row.model == "mobilenetv3_small_050":
            assert row.lr == 0.005
    study = optuna.load_study(study_name=STUDY, storage=study_storage(ExperimentStore(exp)))
    assert len(study.trials) == 4 and len(study.directions) == 2
    front = read_results(exp / "pareto.csv")
    assert len(front) >= 1 and (front["latency_ms"] > 0).all()
    summary = json.loads((exp / "summary.json").read_text())
    assert {p["trial_id"] for p in summary["pareto"]} == set(front["trial_id"])
    assert set(summary["start"]["by_model"]) == set(starts)
    assert (exp / "plots" / "pareto_front.png").is_file()
