"""The experiment folder: every path in one place, the "finished?" rule, relative records."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from trainables.checkpoint import Checkpoint, save_checkpoint
from trainables.config import TrainConfig
from trainables.errors import UserError
from trainables.start import Start
from trainables.store import (
    ExperimentStore,
    check_experiment_name,
    epochs_path,
    finished,
    ranked,
    resume_path,
    snapshot_path,
    snapshots,
)


def _checkpoint(path, cfg: TrainConfig, epoch: int = 1) -> None:
    Checkpoint({"w": torch.zeros(1)}, dataclasses.asdict(cfg), ["a", "b"], 8, [0.5] * 3,
               [0.2] * 3, epoch=epoch).save(path)


def test_every_path_lies_inside_the_experiment_folder(tmp_path):
    store = ExperimentStore.at(tmp_path / "runs", "exp")
    paths = [store.checkpoint("t1"), store.trial_record("t1"), store.warm_checkpoint("m"),
             store.warm_checkpoint("m2", primary=False), store.refit_checkpoint,
             store.seed_checkpoint("t1", 1000), store.fold_checkpoint("k5-ab", "t1", 2),
             store.student_checkpoint("s"), store.init_path("m2", primary=False),
             store.model_report_dir("ensemble"), store.data_report_dir, store.plots_dir,
             store.ray_dir, store.ensemble_dir, store.path("summary.json")]
    for p in paths:
        assert p.is_relative_to(store.dir), p
    assert len(set(paths)) == len(paths)  # no two things share a path
    assert store.warm_checkpoint("m") != store.warm_checkpoint("m", primary=False)
    assert store.relative(store.refit_checkpoint) == "refit/final.pt"
    assert store.resolve("refit/final.pt") == store.refit_checkpoint


def test_a_run_folder_keeps_its_files_beside_its_checkpoint(tmp_path):
    best = tmp_path / "run" / "best.pt"
    assert resume_path(best) == tmp_path / "run" / "resume.pt"
    assert epochs_path(best).parent == best.parent
    for n in (10, 2, 9):
        snapshot_path(best, n).parent.mkdir(parents=True, exist_ok=True)
        snapshot_path(best, n).write_bytes(b"")
    assert [p.name for p in snapshots(best)] == ["epoch_2.pt", "epoch_9.pt", "epoch_10.pt"]


def test_finished_means_a_checkpoint_no_resume_state_and_the_same_recipe(tmp_path):
    cfg = TrainConfig(epochs=3, threads=2)
    best = tmp_path / "run" / "best.pt"
    assert not finished(best)  # nothing yet
    _checkpoint(best, cfg)
    save_checkpoint({"epoch": 1}, resume_path(best))
    assert not finished(best, cfg)  # still running (or interrupted)
    resume_path(best).unlink()
    assert finished(best) and finished(best, cfg)
    assert finished(best, dataclasses.replace(cfg, threads=16))  # threads are not the recipe
    assert not finished(best, dataclasses.replace(cfg, lr=0.5))  # another recipe's leftovers


def test_results_are_stored_relative_and_read_back_absolute(tmp_path):
    store = ExperimentStore(tmp_path / "exp")
    ckpt = store.checkpoint("t1")
    table = pd.DataFrame({"trial_id": ["007", "8"], "status": ["completed", "failed"],
                          "best_val_acc": [0.9, np.nan], "best_val_loss": [0.3, np.nan],
                          "checkpoint": [str(ckpt), ""]})
    store.write_results(table)
    assert pd.read_csv(store.path("results.csv"))["checkpoint"][0] == "checkpoints/t1/best.pt"
    back = store.read_results()
    assert back["trial_id"].tolist() == ["007", "8"]  # ids stay text
    assert back["checkpoint"].tolist() == [str(ckpt), ""]


def test_ranked_puts_usable_trials_first_by_score_then_loss():
    table = pd.DataFrame({"trial_id": list("abcd"),
                          "status": ["failed", "completed", "stopped_early", "completed"],
                          "best_val_acc": [0.99, 0.8, 0.9, 0.9],
                          "best_val_loss": [0.1, 0.5, 0.4, 0.3],
                          "checkpoint": ["x", "y", "z", "w"]})
    assert ranked(table)["trial_id"].tolist() == ["d", "c", "b", "a"]


def test_init_files_hold_a_start_per_architecture(tmp_path):
    store = ExperimentStore(tmp_path / "exp")
    first = Start({"w": torch.ones(2)}, [0.1] * 3, [0.2] * 3, "warm", {"val_acc": 0.5}, "m1")
    other = Start({"w": torch.zeros(2)}, [0.3] * 3, [0.4] * 3, "random", model="m2")
    store.write_init(first)
    store.write_init(other, primary=False)
    assert store.read_init().id == first.id and store.read_init("m1").kind == "warm"
    assert store.read_init("m2").id == other.id  # its own file
    assert store.read_init("m3").id == first.id  # an architecture without one: the primary


def test_the_lock_admits_one_process(tmp_path):
    store = ExperimentStore(tmp_path / "exp")
    held = store.lock()
    with pytest.raises(UserError, match="in use by another"):
        ExperimentStore(tmp_path / "exp").lock()
    held.close()
    store.lock().close()


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "-x", "../x"])
def test_experiment_names_stay_inside_the_storage(name):
    with pytest.raises(UserError, match="plain folder name"):
        check_experiment_name(name)
