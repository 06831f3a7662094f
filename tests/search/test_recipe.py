"""--recipe-only (what a --time-budget too small for a search chooses): the recommended recipe,
trained once on train + val, is the final model of the search and of ensemble.build. Real Ray,
real MLflow store, real image files."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import image_folder, run_module

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("recipe")
    image_folder(work / "images", per_class=12)
    (work / "new").mkdir()
    for f in work.glob("images/c*/[01].png"):  # 6 images to --predict
        (work / "new" / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    proc = run_module("search.run", ["--data", str(work / "images"), "--image-size", "32",
                                    "--recipe-only", "--max-epochs", "2", "--time-budget", "30m",
                                    "--space",
                                    "batch_size=[8,16]", "--experiment", "rec", "--num-cpus", "2"],
                     work)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {"work": work, "exp": work / "runs" / "rec", "log": proc.stdout + proc.stderr}


def test_the_recipe_trains_once_on_train_and_val_with_no_trial(recipe):
    exp = recipe["exp"]
    summary = json.loads((exp / "summary.json").read_text())
    sizes = summary["split_sizes"]
    assert summary["recipe_only"] and summary["best_trial"] is None and summary["trials"] == {}
    assert summary["refit"]["train_images"] == sizes["train"] + sizes["val"]
    assert summary["refit"]["epochs"] == 2  # the recommended length: --max-epochs
    # with a budget the run fits its length to the time left, within the user's --max-epochs
    assert summary["refit"]["config"]["fit_cap"] == 2 and summary["refit"]["config"]["fit_by"] > 0
    assert summary["final"]["model"] == "refit" and (exp / "refit" / "final.pt").is_file()
    assert not (exp / "results.csv").exists() and not list(exp.glob("trials/*"))
    config = yaml.safe_load((exp / "config.yaml").read_text())
    assert config["recipe_only"] and config["init"] == "random"  # no warm start either
    # every searched setting fixed at its recommended value, fitted into the space
    assert config["space"]["batch_size"] == 8 and config["space"]["scheduler"] == "onecycle"
    assert not any(isinstance(v, (dict, list)) for v in config["space"].values())
    assert "recommended recipe (no search)" in recipe["log"]
    # a plan that leaves no room for trials at the whole machine's speed times no trial
    assert "ms per training image alone" in recipe["log"] and "per trial" not in recipe["log"]
    assert (exp / "model_report" / "recipe" / "report.md").is_file()


def test_ensemble_build_answers_with_the_recipe_and_predicts(recipe):
    out = recipe["work"] / "predictions.csv"
    proc = run_module("ensemble.build", ["--experiment", "rec", "--top", "5", "--predict",
                                        str(recipe["work"] / "new"), "--output", str(out)],
                     recipe["work"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((recipe["exp"] / "ensemble" / "report.json").read_text())
    summary = json.loads((recipe["exp"] / "summary.json").read_text())
    assert report["chosen"] == "refit" and [r["name"] for r in report["rows"]] == ["refit"]
    # one answer: the same model and the same test figure in both files
    assert summary["final"]["model"] == report["final"]["model"] == "refit"
    assert report["final"]["test"]["accuracy"] == pytest.approx(
        summary["refit"]["test"]["accuracy"], abs=1e-6)
    assert len(out.read_text().splitlines()) == 1 + 6


def test_seed_retrains_of_a_recipe_only_experiment_are_refused_in_one_sentence(recipe):
    proc = run_module("ensemble.build", ["--experiment", "rec", "--seeds", "1"], recipe["work"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "recommended recipe only" in proc.stderr and "--seeds" in proc.stderr
