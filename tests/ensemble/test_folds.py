"""K-fold CV ensembles: the folds themselves (fast, on a real CSV with groups), then
`python -m ensemble.build --folds` end to end on a tiny real search (real Ray, MLflow, files)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ensemble
from conftest import run_module, write_image
from ensemble.build import main as build_main
from ensemble.folds import draw_folds, plan_folds
from ensemble.members import SearchState
from search.config import SearchConfig
from trainables.checkpoint import Checkpoint
from trainables.data import load_data
from trainables.errors import UserError
from trainables.split import draw_split
from trainables.start import Start
from trainables.store import ExperimentStore

FOLD_ROWS = ["folds best config", "folds soft vote", "folds weighted vote"]
slow = pytest.mark.slow


def _grouped_csv(root: Path, per_class: int = 20, group_size: int = 2) -> Path:
    """3 classes; patients of `group_size` consecutive images of one class; the last image of
    class 0 is a byte copy of its first, under another patient (copies must share a fold)."""
    rng = np.random.default_rng(3)
    rows = ["image_path,target,patient"]
    for k in range(3):
        for i in range(per_class):
            rel = f"img/{k}_{i}.png"
            write_image(root / rel, k, rng)
            rows.append(f"{rel},c{k},p{k}_{i // group_size}")
    shutil.copy(root / "img/0_0.png", root / "img/0_copy.png")
    rows.append("img/0_copy.png,c0,p_copy")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root / "train.csv"


def _state(tmp_path: Path, csv: Path, group_col: str | None = "patient") -> SearchState:
    data = load_data(csv, image_size=24, group_col=group_col)
    split = draw_split(data.labels, val_fraction=0.15, test_fraction=0.15, seed=0,
                       class_names=data.class_names, groups=data.groups)
    config = SearchConfig(data=str(csv), group_col=group_col, seed=0)
    return SearchState(ExperimentStore(tmp_path / "runs" / "x"), config, pd.DataFrame(), data,
                       split)


def _pool(state: SearchState, seed: int) -> set[int]:
    split = draw_split(state.data.labels, val_fraction=0.15, test_fraction=0.15, seed=seed,
                       class_names=state.data.class_names, groups=state.data.groups)
    return set(split.train) | set(split.val)


def test_folds_are_stratified_group_disjoint_and_never_hold_test(tmp_path):
    csv = _grouped_csv(tmp_path / "data")
    state = _state(tmp_path, csv)
    plan = plan_folds(state, 4)
    split, labels = state.split, state.data.labels
    assert plan.grouped and plan.group_col == "patient"
    assert np.array_equal(plan.pool, np.sort(np.concatenate([split.train, split.val])))
    assert not set(plan.pool) & set(split.test)
    held = [plan.held_out(f) for f in range(4)]
    assert sorted(np.concatenate(held).tolist()) == plan.pool.tolist()  # each index once
    patient = dict(zip(*pd.read_csv(csv)[["image_path", "patient"]].T.values))
    for f in range(4):
        assert not set(held[f]) & set(plan.training(f))
        inside = {patient[state.data.ids[i]] for i in held[f]}
        outside = {patient[state.data.ids[i]] for i in plan.training(f)}
        assert not inside & outside, f"fold {f} shares patients with its training part"
        counts = np.bincount(labels[held[f]], minlength=3)
        expected = np.bincount(labels[plan.pool], minlength=3) / 4
        assert (np.abs(counts - expected) <= 2).all(), (f, counts, expected)  # one group off
    ids = state.data.ids
    first, copy = ids.index("img/0_0.png"), ids.index("img/0_copy.png")
    # identical images in the pool share a fold; the split's groups decide where they go (the
    # copy is another patient here, and seed 0 puts the original in test): take the first split
    # seed that leaves both in the pool
    seed = next(s for s in range(1, 50) if {first, copy} <= _pool(state, s))
    moved = dataclasses.replace(state, split=draw_split(
        state.data.labels, val_fraction=0.15, test_fraction=0.15, seed=seed,
        class_names=state.data.class_names, groups=state.data.groups))
    again = plan_folds(moved, 4)
    assert again.fold_of[again.pool == first] == again.fold_of[again.pool == copy]
    assert plan.key == plan_folds(state, 4).key  # drawn from the seed: the same again
    assert plan.key != plan_folds(state, 3).key


def test_without_groups_folds_are_plain_stratified_k_folds():
    labels = np.repeat(np.arange(3), [30, 20, 10])
    pool = np.arange(60)
    fold_of = draw_folds(labels, pool, 5, seed=1)
    for f in range(5):
        assert np.bincount(labels[pool[fold_of == f]], minlength=3).tolist() == [6, 4, 2]


@pytest.mark.parametrize("k,group_col,needle", [
    (1, "patient", "--folds must be at least 2"),
    (12, "patient", "more than class"),
    (3, "nope", "has no group column 'nope'"),
    (3, "ward", "holds no image of class"),
])
def test_bad_folds_are_one_sentence(tmp_path, k, group_col, needle):
    csv = _grouped_csv(tmp_path / "data", per_class=10)
    table = pd.read_csv(csv)
    table["ward"] = np.where(table["target"] == "c2", "w2", "w" + table.index.astype(str))
    table.to_csv(csv, index=False)  # class c2 is one ward: every fold but one lacks it
    state = _state(tmp_path, csv, group_col=None)
    with pytest.raises(UserError, match=needle):
        plan_folds(state, k, group_col)


# ---------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def folds(tmp_path_factory) -> dict:
    """A tiny search on a CSV with a group column, then one `ensemble.build --folds 3`."""
    work = tmp_path_factory.mktemp("folds")
    csv = _grouped_csv(work / "data", per_class=14)
    proc = run_module("search.run", [
        "--data", str(csv), "--group-col", "patient", "--image-size", "24", "--num-samples",
        "2", "--max-epochs", "2", "--grace-period", "2", "--space", "batch_size=[8]",
        "--experiment", "cv", "--num-cpus", "2", "--no-refit", "--init", "random"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    build = run_module("ensemble.build", ["--experiment", "cv", "--top", "2", "--folds", "3",
                                         "--num-cpus", "2"], work)
    assert build.returncode == 0, build.stderr[-3000:]
    exp = work / "runs" / "cv"
    (folds_dir,) = (exp / "folds").iterdir()
    return {"work": work, "exp": exp, "csv": csv, "dir": folds_dir, "stderr": build.stderr}


@slow
def test_fold_rows_and_cv_scores_are_reported(folds):
    report = json.loads((folds["exp"] / "ensemble" / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert [n for n in rows if n.startswith("folds")] == FOLD_ROWS
    single = rows["best single"]["params_x_members"]
    for name in FOLD_ROWS:
        assert set(rows[name]["test"]) == {"accuracy", "f1", "loss", "ece"}
        assert rows[name]["params_x_members"] == single * len(rows[name]["members"])
        assert "out-of-fold" in rows[name]["note"]
    assert len(rows["folds soft vote"]["members"]) == 2 * 3
    assert report["folds"]["k"] == 3 and report["folds"]["group_col"] == "patient"
    assert len(report["cv"]) == 2
    for c in report["cv"]:
        assert len(c["per_fold"]) == 3 and c["cv_std"] >= 0
        assert c["cv_mean"] == pytest.approx(np.mean(c["per_fold"]))
    md = (folds["exp"] / "ensemble" / "report.md").read_text()
    assert "## Cross-validation: 3 folds" in md and " ± " in md

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{folds['work'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cv")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'ensemble'")
    assert run.data.params["folds"] == "3"
    assert f"cv.{report['cv'][0]['config']}.mean" in run.data.metrics
    assert "folds_weighted_vote.test_accuracy" in run.data.metrics


@slow
def test_oof_covers_train_and_val_once_and_folds_keep_groups_apart(folds):
    split = json.loads((folds["exp"] / "split.json").read_text())
    record = json.loads((folds["dir"] / "folds.json").read_text())
    pool = sorted(split["train"] + split["val"])
    assert record["pool"] == pool and record["test"] == split["test"]
    for trial in (d for d in folds["dir"].iterdir() if d.is_dir()):
        oof = pd.read_csv(trial / "oof.csv")
        assert sorted(oof["index"]) == pool  # every train + val image exactly once
        assert not set(oof["index"]) & set(split["test"])
        probs = oof[[c for c in oof.columns if c.startswith("prob_")]].to_numpy()
        assert np.allclose(probs.sum(1), 1, atol=1e-4)
    patient = dict(zip(*pd.read_csv(folds["csv"])[["image_path", "patient"]].T.values))
    ids = dict(zip(split["train"] + split["val"], split["ids"]["train"] + split["ids"]["val"]))
    fold_of = dict(zip(record["pool"], record["fold_of"]))
    for f in range(3):
        inside = {patient[ids[i]] for i in pool if fold_of[i] == f}
        outside = {patient[ids[i]] for i in pool if fold_of[i] != f}
        assert not inside & outside


@slow
def test_fold_models_are_loadable_checkpoints_from_the_shared_start(folds):
    init_id = Start.load(folds["exp"] / "init.pt").id
    data = ExperimentStore(folds["exp"]).read_data()
    paths = sorted(folds["dir"].glob("*/fold*/best.pt"))
    assert len(paths) == 6
    for p in paths[:2]:
        ckpt = Checkpoint.load(p)
        assert ckpt.init_id == init_id
        probs = ensemble.load(p).predict_proba(data.images[:5])
        assert probs.shape == (5, 3) and np.allclose(probs.sum(1), 1, atol=1e-4)


@slow
def test_resume_retrains_only_the_unfinished_fold(folds):
    paths = sorted(folds["dir"].glob("*/fold*/best.pt"))
    gone = paths[0]
    gone.unlink()  # an interrupted fold: its model never finished
    before = {p: p.stat().st_mtime_ns for p in paths[1:]}
    proc = run_module("ensemble.build", ["--experiment", "cv", "--top", "2", "--folds", "3",
                                        "--num-cpus", "2"], folds["work"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 of 6 fold model(s) already trained, reused" in proc.stderr
    assert "0 of 6" in folds["stderr"]
    assert gone.is_file()
    assert {p: p.stat().st_mtime_ns for p in paths[1:]} == before


@slow
@pytest.mark.parametrize("args,needle", [
    (["--folds", "1"], "--folds must be at least 2"),
    (["--folds", "40"], "more than class"),
    (["--folds", "3", "--group-col", "nope"], "has no group column 'nope'"),
    (["--group-col", "patient"], "--group-col only shapes the folds"),
])
def test_bad_input_is_one_sentence_and_changes_nothing(folds, args, needle, capsys,
                                                       monkeypatch):
    monkeypatch.chdir(folds["work"])
    report = folds["exp"] / "ensemble" / "report.json"
    before = report.read_bytes()
    assert build_main(["--experiment", "cv", "--top", "2", *args]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error:") and needle in err and "Traceback" not in err
    assert report.read_bytes() == before
