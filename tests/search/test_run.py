"""End to end: real local Ray, real Optuna, real MLflow store, real image files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, image_folder, read_results, start_search
from trainables.store import epochs_path

pytestmark = pytest.mark.slow
SIX = {"lr", "weight_decay", "batch_size", "dropout", "epochs", "scheduler"}
TINY = ["--image-size", "32", "--space", "batch_size=[8,16]", "--max-epochs", "2",
        "--grace-period", "1", "--num-cpus", "2"]
NODE_CPUS = 2  # TINY's --num-cpus: the local Ray node's CPUs
BARE = ["--init", "random", "--no-refit"]  # for tests about other things: no warm start, refit


def _cli(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(cwd)])}
    return subprocess.run([sys.executable, "-m", "search.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> dict:
    """One small search through the real CLI, shared by the checks below."""
    work = tmp_path_factory.mktemp("e2e")
    data = image_folder(work / "images")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    proc = _cli(["--data", str(data), "--num-samples", "3", "--experiment", "e2e",
                 "--storage", str(work / "runs"), "--tracking-uri", uri, *TINY], work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"work": work, "uri": uri, "exp_dir": work / "runs" / "e2e", "stdout": proc.stdout,
            "stderr": proc.stderr}


def test_search_writes_results_and_summary(searched):
    exp = searched["exp_dir"]
    table = read_results(exp / "results.csv")
    assert len(table) == 3
    assert set(table["status"]) <= {"completed", "stopped_early"}
    assert SIX <= set(table.columns)
    assert (table["epochs_run"] >= 1).all()
    assert table["best_val_acc"].is_monotonic_decreasing or table["best_val_acc"].iloc[0] == \
        table["best_val_acc"].max()
    for ckpt in table["checkpoint"]:  # relative to the experiment folder, so it can move
        assert not Path(ckpt).is_absolute() and (exp / ckpt).is_file()
    summary = json.loads((exp / "summary.json").read_text())
    # the top trial on val, or the recommended recipe kept within one standard error of it
    chosen = summary["best_trial"]["trial_id"]
    assert chosen == table["trial_id"].iloc[0] or \
        f"(trial {chosen}) on val by" in searched["stderr"] + searched["stdout"]
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    split = json.loads((exp / "split.json").read_text())
    assert summary["split_hash"] == split["hash"]
    assert len(split["test"]) == summary["split_sizes"]["test"] > 0
    assert not set(split["test"]) & set(split["train"])
    assert (exp / "config.yaml").is_file() and (exp / "init.pt").is_file()
    assert "trials, best first" in searched["stdout"]
    out = searched["stdout"]  # where the run stands: after each trial, and per phase
    assert "trials: 3 finished, 0 running of 3 planned; best val accuracy " in out
    assert "[warm start | " in out and "[refit | " in out and "[search | " in out


def test_status_lines_give_time_used_and_left():
    import re

    from search.stages import Clock

    line = Clock(time.time() - 125, 600.0).line("search", "trials: 1 finished")
    assert re.fullmatch(r"\[search \| 2m0\ds used, 7m5\ds left of 10m00s\] trials: 1 finished",
                        line), line
    assert Clock(time.time(), None).line("refit").startswith("[refit | 0s used]")


def test_every_trial_fine_tunes_from_the_one_warm_start(searched):
    from trainables.checkpoint import Checkpoint
    from trainables.start import Start

    exp = searched["exp_dir"]
    init = Start.load(exp / "init.pt")
    assert init.kind == "warm" and 0.0 <= init.facts["val_acc"] <= 1.0
    warm = Checkpoint.load(exp / "warm" / "best.pt")  # the warm start's own checkpoint
    assert all(torch.equal(v, warm.model[k]) for k, v in init.state.items())
    table = read_results(exp / "results.csv")
    ids = {Checkpoint.load(exp / c).init_id for c in table["checkpoint"]}
    assert ids == {init.id}
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["start"]["kind"] == "warm" and summary["start"]["id"] == init.id
    assert init.facts["threads"] == NODE_CPUS  # the warm start trains on the whole node


def test_refit_on_train_and_val_is_the_final_model(searched):
    from trainables.checkpoint import Checkpoint

    exp = searched["exp_dir"]
    summary = json.loads((exp / "summary.json").read_text())
    refit, final = summary["refit"], summary["final"]
    assert final["model"] == "refit" and final["checkpoint"] == refit["checkpoint"]
    labelled = summary["split_sizes"]["train"] + summary["split_sizes"]["val"]
    assert refit["train_images"] == labelled and refit["threads"] == NODE_CPUS
    ckpt = Checkpoint.load(exp / refit["checkpoint"])
    batch = ckpt.train_config.batch_size  # what its epochs really trained: every labelled image
    trained = [r["train_images"] for r in json.loads(epochs_path(exp / refit["checkpoint"])
                                                       .read_text())]
    whole = labelled if labelled <= batch else labelled // batch * batch  # full batches only
    assert trained and set(trained) == {whole}
    assert refit["test"]["accuracy"] >= 1 / 3 and "f1" in refit["test"]  # chance is 1/3
    chosen = Checkpoint.load(exp / summary["best_trial"]["checkpoint"])
    assert ckpt.train_config.recipe() == chosen.train_config.recipe()
    assert len(ckpt.val_indices) == 0  # no image was held out from it
    assert "refit on train + val" in searched["stderr"]


def test_the_refit_is_a_row_of_the_build_and_one_answer_remains(searched, tmp_path):
    """ensemble.build weighs the refit against the trials and their ensembles; the row it
    chooses is the final model, in its report and in summary.json alike."""
    import shutil

    shutil.copytree(searched["exp_dir"], tmp_path / "runs" / "e2e")
    shutil.copy(searched["work"] / "mlflow.db", tmp_path / "mlflow.db")  # the module's stays
    doc = tmp_path / "runs" / "e2e" / "mlflow.json"  # as it is
    doc.write_text(json.dumps(json.loads(doc.read_text()) | {
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "ensemble.build", "--experiment", "e2e",
                           "--storage", str(tmp_path / "runs"), "--top", "2"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = tmp_path / "runs" / "e2e"
    report = json.loads((exp / "ensemble" / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    summary = json.loads((exp / "summary.json").read_text())
    refit = rows["refit"]
    # its trial's val figures: the trial the search chose, predicted as the build predicts
    # (over the flips it trained with)
    from models import load_model
    from models.predict import AUTO, predict

    data, split = np.load(exp / "data.npz"), json.loads((exp / "split.json").read_text())
    trial, ckpt = load_model(exp / summary["best_trial"]["checkpoint"], torch.device("cpu"))
    val = predict(trial, data["images"][split["val"]], ckpt, [AUTO])
    assert refit["val"]["accuracy"] == pytest.approx(
        float((val.argmax(1) == data["labels"][split["val"]]).mean()))
    assert refit["test"]["accuracy"] == pytest.approx(summary["refit"]["test"]["accuracy"],
                                                      abs=1e-6)  # its own test score
    assert report["chosen"] != "best single"  # the refit ties that trial on val and wins
    assert summary["final"] == report["final"] and summary["search_final"]["model"] == "refit"
    assert summary["final"]["test"] == rows[report["chosen"]]["test"]


def _run_tree(client, name: str):
    """The parent run and its trial runs; stage runs (warm start, refit) are left out."""
    parent, children, _ = _run_tree_with_stages(client, name)
    return parent, children


def _run_tree_with_stages(client, name: str):
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = [r for r in children if "trial_id" in r.data.tags]
    stages = [r for r in children if "trial_id" not in r.data.tags]
    return parent, trials, stages


def test_mlflow_run_tree(searched):
    from mlflow import MlflowClient

    client = MlflowClient(searched["uri"])
    parent, children, stages = _run_tree_with_stages(client, "e2e")
    assert sorted(r.data.tags["kind"] for r in stages) == ["refit", "warm-start"]
    for stage in stages:
        assert client.get_metric_history(stage.info.run_id, "train_loss")
    table = read_results(searched["exp_dir"] / "results.csv").set_index("trial_id")
    assert parent.info.status == "FINISHED"
    assert "test_accuracy" in parent.data.metrics
    assert parent.data.params["split_hash"] == json.loads(
        (searched["exp_dir"] / "split.json").read_text())["hash"]
    assert "git_commit" in parent.data.tags or "package_version" in parent.data.tags
    assert len(children) == 3
    for child in children:
        assert SIX <= set(child.data.params)
        assert child.info.status == "FINISHED"
        row = table.loc[child.data.tags["trial_id"]]
        assert float(child.data.params["lr"]) == pytest.approx(row["lr"])
        history = client.get_metric_history(child.info.run_id, "val_acc")
        assert [m.step for m in history] == list(range(1, int(row["epochs_run"]) + 1))
        assert not {"done", "pid", "time_total_s", "time_this_iter_s"} & set(child.data.metrics)
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "confusion_matrix_val.png" in names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_server_serves_the_tree_over_rest(searched):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", searched["uri"],
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=searched["work"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not come up"
                assert server.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        from mlflow import MlflowClient

        parent, children = _run_tree(MlflowClient(base), "e2e")
        assert len(children) == 3
        req = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search", method="POST",
            data=json.dumps({"experiment_ids": [parent.info.experiment_id]}).encode(),
            headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(req, timeout=10))["runs"]
        assert len(runs) == 6  # parent, 3 trials, warm start, refit
        trial_ids = {c.info.run_id for c in children}
        child_params = [{p["key"] for p in r["data"].get("params", [])} for r in runs
                        if r["info"]["run_id"] in trial_ids]
        assert all(SIX <= p for p in child_params)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_ddp_trial_with_two_workers(tmp_path):
    data = image_folder(tmp_path / "images")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _cli(["--data", str(data), "--num-samples", "1", "--workers-per-trial", "2",
                 "--max-epochs", "1", "--experiment", "ddp", "--storage",
                 str(tmp_path / "runs"), "--tracking-uri", uri, "--image-size", "32",
                 "--space", "batch_size=[8]", "--num-cpus", "2", "--init", "random"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DDP x2" in proc.stderr
    # the refit after a DDP search on 2 CPUs (probe case 2: it waited forever for CPUs Ray
    # still held for the ended trial) trains, on what the node has free
    summary = json.loads((tmp_path / "runs" / "ddp" / "summary.json").read_text())
    assert summary["final"]["model"] == "refit" and 1 <= summary["refit"]["threads"] <= 2
    table = read_results(tmp_path / "runs" / "ddp" / "results.csv")
    assert table["status"].tolist() == ["completed"]
    assert (tmp_path / "runs" / "ddp" / table["checkpoint"][0]).is_file()
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    _, children = _run_tree(client, "ddp")
    assert len(client.get_metric_history(children[0].info.run_id, "val_loss")) == 1


def test_resume_after_interrupt_keeps_finished_trials(tmp_path):
    data = image_folder(tmp_path / "images")
    args = ["--data", str(data), "--num-samples", "3", "--max-concurrent", "1",
            "--experiment", "res", "--storage", str(tmp_path / "runs"), "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-refit", *TINY]
    proc = start_search(args, tmp_path)
    results = tmp_path / "runs" / "res" / "results.csv"
    deadline = time.time() + 300
    while not (results.is_file() and len(read_results(results)) >= 1):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no trial finished in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "--resume" in out
    first = read_results(results)
    print(first.to_string())
    done = first[first["status"].isin(["completed", "stopped_early"])]
    assert 1 <= len(done) < 3
    exp = tmp_path / "runs" / "res"
    stamps = {t: (exp / c).stat().st_mtime_ns for t, c in zip(done["trial_id"], done["checkpoint"])}
    warm_stamp = (exp / "init.pt").stat().st_mtime_ns

    resumed = _cli(["--resume", "--experiment", "res", "--storage", str(tmp_path / "runs")],
                   tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    final = read_results(results)
    assert len(final) == 3 and final["status"].isin(["completed", "stopped_early"]).all()
    for trial, stamp in stamps.items():  # finished trials were not trained again
        row = final[final["trial_id"] == trial].iloc[0]
        assert (exp / row["checkpoint"]).stat().st_mtime_ns == stamp
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, children, stages = _run_tree_with_stages(client, "res")
    assert len(children) == 3
    # the warm start was trained once: --resume reused it
    assert (exp / "init.pt").stat().st_mtime_ns == warm_stamp
    assert [s.data.tags["kind"] for s in stages] == ["warm-start"]
    assert "warm start" not in resumed.stderr


FLAKY = '''
import os, pathlib, ray, timm
from timm.models import register_model

@register_model
def flaky_net(pretrained=False, num_classes=10, drop_rate=0.0, **kwargs):
    marker = pathlib.Path(os.environ["FLAKY_MARKER"])
    in_trial = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    if in_trial and not marker.exists():  # the first trial fails once, like a lost worker
        marker.write_text("failed once")
        raise RuntimeError("injected failure")
    return timm.create_model("resnet10t", num_classes=num_classes, drop_rate=drop_rate)
'''


@pytest.mark.parametrize("max_failures,outcome", [(1, "completed"), (0, "failed")])
def test_failing_trial_is_retried_and_does_not_stop_search(tmp_path, max_failures, outcome):
    (tmp_path / "flaky_models.py").write_text(FLAKY)
    data = image_folder(tmp_path / "images")
    marker = tmp_path / "marker"
    env_marker = {"FLAKY_MARKER": str(marker)}
    args = ["--data", str(data), "--model", "flaky_net", "--plugins", "flaky_models",
            "--num-samples", "2", "--max-concurrent", "1", "--max-failures", str(max_failures),
            "--space", "epochs=1", "--experiment", "flaky", "--storage", str(tmp_path / "runs"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *TINY, *BARE]
    os.environ.update(env_marker)
    try:
        proc = _cli(args, tmp_path)
    finally:
        os.environ.pop("FLAKY_MARKER")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert marker.read_text() == "failed once"
    table = read_results(tmp_path / "runs" / "flaky" / "results.csv")
    assert len(table) == 2
    assert (table["status"] == "failed").sum() == (1 if outcome == "failed" else 0)
    assert (table["status"] == "completed").sum() >= 1


def test_trial_that_can_never_fit_is_refused(tmp_path):
    data = image_folder(tmp_path / "images")
    proc = _cli(["--data", str(data), "--cpus-per-worker", "8", "--num-cpus", "2",
                 "--storage", str(tmp_path / "runs"), "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: a trial needs 8 CPU")
    assert "Traceback" not in proc.stderr


def test_existing_experiment_is_not_overwritten(searched):
    before = (searched["exp_dir"] / "results.csv").read_bytes()
    proc = _cli(["--experiment", "e2e", "--storage", str(searched["work"] / "runs")],
                searched["work"])
    assert proc.returncode == 2 and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert (searched["exp_dir"] / "results.csv").read_bytes() == before
