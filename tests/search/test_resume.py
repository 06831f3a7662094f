"""Continuing a search from plain data: ended trials kept, interrupted ones run again in their
own folders, the sampler's running trials told they failed. No search needed."""

from __future__ import annotations

import optuna
import pandas as pd

from search.resume import STUDY, adopt_folder, config_key, continuation, study_storage
from trainables.store import ExperimentStore


def _left_by_an_interrupted_search(tmp_path) -> ExperimentStore:
    store = ExperimentStore(tmp_path / "exp")
    table = pd.DataFrame({"trial_id": ["a", "b", "c"],
                          "status": ["completed", "failed", "interrupted"],
                          "best_val_acc": [0.9, None, 0.5], "best_val_loss": [0.2, None, 0.9],
                          "checkpoint": [str(store.checkpoint("a")), "",
                                         str(store.checkpoint("c"))]})
    store.write_results(table)
    for tid, lr in (("a", 0.1), ("b", 0.2), ("c", 0.3)):
        store.write_trial_record(tid, {"lr": lr})
    store.checkpoint("c").write_bytes(b"partial")  # the interrupted trial's best so far
    study = optuna.create_study(study_name=STUDY, storage=study_storage(store),
                                direction="maximize")
    done = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 1.0)})
    study.tell(done, 0.9)
    running = study.ask()  # c: proposed, never told how it ended
    running.suggest_float("lr", 0.01, 1.0)
    return store


def test_a_continuation_keeps_ended_trials_and_reruns_interrupted_ones(tmp_path):
    store = _left_by_an_interrupted_search(tmp_path)
    cont = continuation(store)
    assert sorted(cont.ended["trial_id"]) == ["a", "b"] and cont.count == 2
    assert len(cont.pending) == 1 and set(cont.pending[0]) == {"lr"}  # proposed again first
    assert cont.adopt == {config_key({"lr": 0.3}): "c"} == store.read_adoptions()
    study = optuna.load_study(study_name=STUDY, storage=study_storage(store))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]


def test_enqueued_points_that_never_started_come_after_the_interrupted_ones(tmp_path):
    """A search stopped during its first trial leaves its second first point enqueued: proposed
    again after the interrupted trial, not served before it."""
    store = _left_by_an_interrupted_search(tmp_path)
    study = optuna.load_study(study_name=STUDY, storage=study_storage(store))
    (running,) = [t.params for t in study.trials if t.state.name == "RUNNING"]
    study.enqueue_trial({"lr": 0.5})
    cont = continuation(store)
    assert cont.pending == [running, {"lr": 0.5}]
    states = [t.state.name for t in optuna.load_study(
        study_name=STUDY, storage=study_storage(store)).trials]
    assert "WAITING" not in states and "RUNNING" not in states


def test_a_rerun_trial_takes_over_the_interrupted_one_s_folder(tmp_path):
    store = _left_by_an_interrupted_search(tmp_path)
    continuation(store)
    adopt_folder(store, "new", {"lr": 0.3})
    assert store.checkpoint("new").read_bytes() == b"partial"
    assert not store.checkpoint("c").parent.exists()
    assert {r["trial_id"] for r in store.trial_records()} == {"a", "b", "new"}
    adopt_folder(store, "other", {"lr": 0.7})  # a new config: a folder of its own
    assert not store.checkpoint("other").exists()
