"""MLflow as the product's face, end to end on one tiny real search: the model-training view,
the dataset record, the data and model reports, registered models served over REST by
`mlflow models serve` and loaded by `mlflow.pyfunc.load_model` in a fresh process."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import ensemble
from conftest import REPO, write_image
from trainables.data import decode_images

pytestmark = pytest.mark.slow
TINY = ["--image-size", "32", "--init", "random", "--no-refit", "--max-epochs", "1",
        "--num-samples", "2", "--space", "batch_size=[8]", "--num-cpus", "2"]


def _run(module: str, args: list[str], work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": _uri(work)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)


def _uri(work: Path) -> str:
    return f"sqlite:///{work / 'mlflow.db'}"


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> dict:
    """A search of 2 one-epoch trials on 3 classes of real PNGs (plus a planted duplicate and a
    corrupt file) registered as 'imgs-search', then its ensemble registered as 'imgs-ens'."""
    work = tmp_path_factory.mktemp("reg")
    rng = np.random.default_rng(0)
    images = work / "images"
    for k in range(3):
        for i in range(12):
            write_image(images / f"c{k}" / f"{i}.png", k, rng)
    shutil.copy(images / "c1/0.png", images / "c1/copy.png")
    (images / "c2/corrupt.png").write_bytes((images / "c2/0.png").read_bytes()[:60])
    search = _run("search.run", ["--data", str(images), "--experiment", "reg",
                                 "--register", "imgs-search", *TINY], work)
    assert search.returncode == 0, search.stderr[-3000:]
    build = _run("ensemble.build", ["--experiment", "reg", "--top", "2",
                                    "--register", "imgs-ens"], work)
    assert build.returncode == 0, build.stderr[-3000:]
    return {"work": work, "images": images, "exp": work / "runs" / "reg",
            "search": search, "build": build}


def _client(work: Path):
    from mlflow import MlflowClient

    return MlflowClient(_uri(work))


def _parent(client, exp_id: str):
    return next(r for r in client.search_runs([exp_id])
                if r.data.tags.get("kind") == "search")


def test_experiment_opens_in_the_model_training_view_with_its_dataset(registered):
    client = _client(registered["work"])
    exp = client.get_experiment_by_name("reg")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(json.loads(exp.tags["mlflow.sharedViewState.imgsearch"])["state"])
    assert {"params.`lr`", "params.`scheduler`", "metrics.`best_val_acc`"} <= \
        set(view["selectedColumns"])
    assert view["orderByKey"] == "metrics.`best_val_acc`" and not view["orderByAsc"]
    assert "params.`model`" not in view["selectedColumns"]  # fixed, not searched
    split = json.loads((registered["exp"] / "split.json").read_text())
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if "trial_id" in r.data.tags]
    assert len(trials) == 2
    for run in [_parent(client, exp.experiment_id), *trials]:
        (record,) = run.inputs.dataset_inputs
        assert record.dataset.digest == split["hash"] and record.dataset.name == "images"
        assert json.loads(record.dataset.source)["uri"] == str(registered["images"])
        profile = json.loads(record.dataset.profile)
        assert [profile[k] for k in ("train", "val", "test")] == \
            [len(split[k]) for k in ("train", "val", "test")]


def test_search_logs_the_data_and_model_reports(registered):
    client = _client(registered["work"])
    parent = _parent(client, client.get_experiment_by_name("reg").experiment_id)
    local = client.download_artifacts(parent.info.run_id, "data_report/report.json",
                                      str(registered["work"]))
    data = json.loads(Path(local).read_text())
    assert [u["id"] for u in data["unreadable"]] == ["c2/corrupt.png"]
    assert [sorted(f["id"] for f in g) for g in data["duplicate_groups"]] == \
        [["c1/0.png", "c1/copy.png"]]
    assert "data report: 1 file(s) do not decode" in registered["search"].stderr
    best = json.loads((registered["exp"] / "model_report/best_trial/report.json").read_text())
    assert best["val_images"] == len(json.loads(
        (registered["exp"] / "split.json").read_text())["val"]) and best["gradcam"]
    names = {a.path for a in client.list_artifacts(parent.info.run_id,
                                                   "model_report/best_trial")}
    assert {"model_report/best_trial/errors.png", "model_report/best_trial/gradcam.png"} <= names
    ens = client.search_runs([parent.info.experiment_id], "tags.kind = 'ensemble'")[0]
    assert {a.path for a in client.list_artifacts(ens.info.run_id, "model_report/ensemble")} >= \
        {"model_report/ensemble/errors.png", "model_report/ensemble/report.md"}


def _test_files(registered: dict) -> list[Path]:
    split = json.loads((registered["exp"] / "split.json").read_text())
    return [registered["images"] / i for i in split["ids"]["test"]]


def _expected(saved: Path, files: list[Path]) -> tuple[np.ndarray, list[str]]:
    model = ensemble.load(saved)
    images, kept = decode_images(files, model.image_size, "error")
    return model.predict_proba(images), model.class_names


LOAD = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model("models:/imgs-search/1")
frame = pd.DataFrame({"image": [open(f, "rb").read() for f in sys.argv[1:]]})
print(json.dumps(model.predict(frame).to_dict(orient="list")))
"""


def test_registered_search_model_loads_in_a_fresh_process(registered, tmp_path):
    client = _client(registered["work"])
    version = client.get_model_version("imgs-search", "1")
    assert version.run_id == _parent(client, client.get_experiment_by_name(
        "reg").experiment_id).info.run_id
    assert "column `image`" in version.description and "base64" in version.description
    files = _test_files(registered)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOAD, *map(str, files)], cwd=tmp_path,
                          env={**env, "MLFLOW_TRACKING_URI": _uri(registered["work"])},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((registered["exp"] / "summary.json").read_text())
    search_final = summary["search_final"]  # what the search registered (build came later)
    assert summary["final"]["chosen_by"].startswith("ensemble.build")
    probs, names = _expected(registered["exp"] / search_final["checkpoint"], files)
    assert np.allclose(np.array([got[f"prob_{c}"] for c in names]).T, probs, atol=1e-5)
    assert got["prediction"] == [names[i] for i in probs.argmax(1)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, rows: list[bytes]) -> dict:
    body = {"dataframe_split": {"columns": ["image"],
                                "data": [[base64.b64encode(r).decode()] for r in rows]}}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=60))


def test_registered_ensemble_answers_rest_predictions(registered, tmp_path):
    port, log = _free_port(), tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": _uri(registered["work"])}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/imgs-ens/1",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=registered["work"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "mlflow models serve did not come up"
                time.sleep(0.5)
        files = _test_files(registered)
        got = _post(f"{base}/invocations", [f.read_bytes() for f in files])["predictions"]
        probs, names = _expected(registered["exp"] / "ensemble" / "ensemble.pt", files)
        assert np.allclose([[g[f"prob_{c}"] for c in names] for g in got], probs, atol=1e-5)
        assert [g["prediction"] for g in got] == [names[i] for i in probs.argmax(1)]
        with pytest.raises(urllib.error.HTTPError) as bad:  # a text file is not an image
            _post(f"{base}/invocations", [files[0].read_bytes(), b"just some text"])
        error = json.loads(bad.value.read())
        assert bad.value.code == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "row 1 of column 'image' does not decode as an image" in error["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_invalid_model_name_is_one_sentence_and_registers_nothing(registered, capsys):
    from ensemble.build import main

    assert main(["--experiment", "reg", "--storage", str(registered["work"] / "runs"),
                 "--register", "bad/name"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --register 'bad/name' is not a valid MLflow model name; use letters, digits, "
        "'-', '_' or '.', without '/' or ':'"]
    names = {m.name for m in _client(registered["work"]).search_registered_models()}
    assert names == {"imgs-search", "imgs-ens"}


def test_a_packaged_vote_needs_nothing_from_the_experiment_folder(registered, tmp_path):
    from models.artifact import Vote
    from models.pyfunc import package
    from trainables.store import ExperimentStore

    members = ExperimentStore(registered["exp"]).usable_trials()["checkpoint"].tolist()
    images, _ = decode_images(_test_files(registered), 32, "error")
    vote = tmp_path / "vote" / "ensemble.pt"
    Vote(members, [0.75, 0.25], tta=["hflip"]).save(vote)
    expected = ensemble.load(vote).predict_proba(images)
    moved = shutil.move(str(package(vote, tmp_path / "packed")), str(tmp_path / "elsewhere"))
    shutil.rmtree(tmp_path / "vote")
    model = ensemble.load(Path(moved) / "ensemble.pt")
    assert len(model.models) == 2 and model.tta == ["hflip"] and model.weights == [0.75, 0.25]
    from trainables.checkpoint import load_checkpoint  # the file as stored: relative members

    assert load_checkpoint(Path(moved) / "ensemble.pt")["members"] == ["members/0.pt",
                                                                       "members/1.pt"]
    assert np.allclose(model.predict_proba(images), expected, atol=1e-6)
