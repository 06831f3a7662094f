"""`python -m ensemble.build` end to end on a real (tiny) search: real Ray, MLflow, image files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ensemble
from conftest import image_folder, run_module, write_image
from trainables.checkpoint import Checkpoint
from trainables.data import load_image_data

pytestmark = pytest.mark.slow
ROWS = ["best single", "hard vote", "soft vote", "weighted vote", "uniform soup", "greedy soup",
        "last-epochs soup"]


@pytest.fixture(scope="module")
def search(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("ens")
    image_folder(work / "images")
    proc = run_module("search.run", [
        "--data", str(work / "images"), "--image-size", "32", "--num-samples", "3",
        "--max-epochs", "2", "--grace-period", "2", "--space", "batch_size=[8]",
        "--experiment", "ens", "--num-cpus", "2", "--no-refit", "--keep-last", "2"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"work": work, "exp": work / "runs" / "ens"}


@pytest.fixture(scope="module")
def built(search) -> Path:
    """`ensemble.build --top 3` on the search, once; the tests below that build again do it on a
    copy of the experiment, so no test depends on another's order."""
    proc = run_module("ensemble.build", ["--experiment", "ens", "--top", "3"], search["work"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return search["exp"] / "ensemble"


def _copy(search: dict, tmp_path: Path, name: str) -> list[str]:
    """A copy of the search's experiment (without its ensemble) under tmp_path/runs/name; the
    options that name it."""
    shutil.copytree(search["exp"], tmp_path / "runs" / name,
                    ignore=shutil.ignore_patterns("ensemble"))
    return ["--experiment", name, "--storage", str(tmp_path / "runs")]


def test_build_reports_every_row_and_saves_a_loadable_ensemble(search, built):
    out = built
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ROWS
    for r in rows.values():
        for split in ("val", "test"):
            assert set(r[split]) == {"accuracy", "f1", "loss", "ece"}
    assert rows["greedy soup"]["val"]["accuracy"] >= rows["best single"]["val"]["accuracy"]
    assert rows["soft vote"]["params_x_members"] == 3 * rows["best single"]["params_x_members"]
    chosen = rows[report["chosen"]]
    best_val = max(r["val"]["accuracy"] for r in rows.values()
                   if not math.isnan(r["val"]["accuracy"]))
    # chosen on val, whatever test says: within one standard error of the best, lowest NLL
    tol = math.sqrt(best_val * (1 - best_val) / len(json.loads(
        (search["exp"] / "split.json").read_text())["val"]))
    tied = [r for r in rows.values() if r["val"]["accuracy"] >= best_val - tol]
    assert chosen["val"]["accuracy"] >= best_val - tol
    assert chosen["val"]["loss"] == min(r["val"]["loss"] for r in tied)
    assert (out / "report.md").read_text().count("|") > 7 * 9
    assert (out / "comparison.png").stat().st_size > 1000

    model = ensemble.load(out / "ensemble.pt")
    data = load_image_data(search["exp"] / "data.npz")
    split = json.loads((search["exp"] / "split.json").read_text())
    probs = model.predict_proba(data.images[split["test"]])
    saved = pd.read_csv(out / "test_predictions.csv")
    cols = [f"prob_{c}" for c in model.class_names]
    assert np.allclose(saved[cols].to_numpy(), probs, atol=1e-4)
    assert saved["prediction"].tolist() == [model.class_names[i] for i in probs.argmax(1)]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{search['work'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ens")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'ensemble'")
    assert len(runs) >= 1
    assert "greedy_soup.test_accuracy" in runs[0].data.metrics
    assert "members" in runs[0].data.params


def test_soups_of_warm_started_trials(search, built):
    """Every trial fine-tuned from the search's warm start, so they (and their last epochs)
    average into soups; the report says how many ingredients each soup took."""
    from trainables.start import Start

    report = json.loads((built / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert Start.load(search["exp"] / "init.pt").kind == "warm"
    uniform, greedy, last = rows["uniform soup"], rows["greedy soup"], rows["last-epochs soup"]
    assert len(uniform["members"]) == 3 and uniform["note"].startswith("3 of 3 ingredients")
    # greedy candidates: 3 members + their kept last epochs (not already a member's best)
    taken, offered = (int(x) for x in greedy["note"].split(" ingredients")[0].split(" of "))
    assert 1 <= taken == len(greedy["members"]) <= offered and offered >= 3
    assert greedy["val"]["accuracy"] >= rows["best single"]["val"]["accuracy"]
    assert len(last["members"]) == 2 and all("epoch_" in m for m in last["members"])
    soup = Checkpoint.load(built / "last-epochs_soup.pt")
    assert soup.soup is not None and len(soup.soup["ingredients"]) == 2
    # each soup's val figures are those of the model saved for it (scored once, not recomputed)
    data = load_image_data(search["exp"] / "data.npz")
    val = json.loads((search["exp"] / "split.json").read_text())["val"]
    for name, row in (("greedy soup", greedy), ("uniform soup", uniform)):
        model = ensemble.load(built / f"{name.replace(' ', '_')}.pt")
        acc = float((model.predict_proba(data.images[val]).argmax(1)
                     == data.labels[val]).mean())
        assert acc == pytest.approx(row["val"]["accuracy"]), name


def test_soup_checkpoint_loads_as_a_training_checkpoint(built):
    from models import load_model

    soup = built / "greedy_soup.pt"
    model, ckpt = load_model(soup, torch.device("cpu"))
    assert ckpt.soup is not None and len(ckpt.soup["ingredients"]) >= 1
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_seeds_add_retrained_members_and_predict_writes_csv(search, tmp_path):
    new = tmp_path / "unlabelled"
    rng = np.random.default_rng(5)
    for i in range(7):
        write_image(new / f"x{i}.jpg", i % 3, rng)
    dest = tmp_path / "sub" / "predictions.csv"
    exp = _copy(search, tmp_path, "seeded")
    proc = run_module("ensemble.build", [*exp, "--top", "2", "--seeds", "1", "--predict", str(new),
                                        "--output", str(dest), "--num-cpus", "2", "--tta", "shift"],
                     search["work"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "seeded" / "ensemble" / "report.json").read_text())
    assert len(report["members"]) == 4
    assert sum("seed" in m["name"] for m in report["members"]) == 2
    assert report["tta"] == ["shift"]
    frame = pd.read_csv(dest)
    assert sorted(frame["image"]) == sorted(f"x{i}.jpg" for i in range(7))
    probs = frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()
    assert probs.shape == (7, 3) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert set(frame["prediction"]) <= {"c0", "c1", "c2"}


@pytest.mark.parametrize("args,needle", [
    (["--experiment", "nope"], "found: ens"),
    (["--experiment", "ens", "--top", "0"], "--top must be at least 1"),
    (["--experiment", "ens", "--tta", "rotate"], "unknown --tta"),
    (["--experiment", "ens", "--predict", "EMPTY"], "no images found"),
])
def test_bad_input_is_one_sentence_and_changes_nothing(search, tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    report = search["exp"] / "ensemble" / "report.json"
    before = report.read_bytes() if report.is_file() else None
    proc = run_module("ensemble.build", args, search["work"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert (report.read_bytes() if report.is_file() else None) == before


def test_top_larger_than_trials_builds_with_what_exists(search, tmp_path):
    proc = run_module("ensemble.build", [*_copy(search, tmp_path, "few"), "--top", "50"],
                     search["work"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fewer than --top 50" in proc.stderr
    report = json.loads((tmp_path / "runs" / "few" / "ensemble" / "report.json").read_text())
    assert len(report["members"]) == 3


def test_members_with_different_classes_are_refused(search, tmp_path):
    copy = tmp_path / "runs" / "mixed"
    shutil.copytree(search["exp"], copy, ignore=shutil.ignore_patterns("ensemble"))
    table = pd.read_csv(copy / "results.csv", dtype={"trial_id": str})
    odd = Checkpoint.load(copy / table["checkpoint"][1])
    odd.class_names = ["a", "b", "c"]
    odd.save(copy / "odd.pt")
    table.loc[1, "checkpoint"] = str(copy / "odd.pt")
    table.to_csv(copy / "results.csv", index=False)
    proc = run_module("ensemble.build", ["--experiment", "mixed", "--storage",
                                        str(tmp_path / "runs"), "--top", "3"], tmp_path)
    assert proc.returncode == 2
    assert "different class lists" in proc.stderr and "Traceback" not in proc.stderr
