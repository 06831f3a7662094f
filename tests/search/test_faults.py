"""The experiment folder under faults: bad names, failed starts, races, planted files, moved
folders, unusable checkpoints, full disks, unreachable clusters and a worker killed mid-trial.
Real searches through the CLI, kept tiny."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, start_search, write_image

pytestmark = pytest.mark.slow
TINY = ["--image-size", "32", "--space", "batch_size=[8]", "--num-cpus", "2", "--init", "random",
        "--no-refit"]


def _images(root: Path, per_class: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for k in range(3):
        for i in range(per_class):
            write_image(root / f"c{k}" / f"{i}.png", k, rng)
    return root


def _run(module: str, args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
                          **kw)


def _one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error:"), proc.stderr[-2000:]
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("faults")
    args = ["--data", str(_images(work / "images")), "--num-samples", "2", "--max-epochs", "1",
            "--experiment", "done", "--storage", str(work / "runs"), "--tracking-uri",
            f"sqlite:///{work / 'mlflow.db'}", *TINY]
    proc = _run("search.run", args, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr  # no teardown noise on a successful run
    built = _run("ensemble.build", ["--experiment", "done", "--storage", str(work / "runs"),
                                    "--top", "2"], work)
    assert built.returncode == 0, built.stderr[-3000:]
    return {"work": work, "exp": work / "runs" / "done", "args": args}


def _copy(finished: dict, tmp_path: Path, name: str = "copy") -> Path:
    dest = tmp_path / "runs" / name
    shutil.copytree(finished["exp"], dest)
    return dest


# ---------------------------------------------------------------- data loss and safety


def test_overwrite_deletes_nothing_when_the_new_search_cannot_start(finished):
    before = (finished["exp"] / "results.csv").read_bytes()
    proc = _run("search.run", [*finished["args"], "--overwrite", "--gpus-per-worker", "1"],
                finished["work"])
    _one_error(proc, "a trial needs")
    assert (finished["exp"] / "results.csv").read_bytes() == before


def test_a_second_process_on_one_experiment_is_refused(finished):
    from trainables.store import ExperimentStore

    held = ExperimentStore(finished["exp"]).lock()
    try:
        _one_error(_run("search.run", [*finished["args"], "--resume"], finished["work"]),
                   "in use")
        _one_error(_run("ensemble.build", ["--experiment", "done", "--storage",
                                           str(finished["work"] / "runs")], finished["work"]),
                   "in use")
    finally:
        held.close()


def test_resume_names_the_options_it_ignores(finished):
    proc = _run("search.run", ["--resume", "--experiment", "done", "--storage",
                               str(finished["work"] / "runs"), "--lr", "0.5",
                               "--max-concurrent", "1"], finished["work"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ignoring --lr" in proc.stderr and "max-concurrent" not in proc.stderr.split(
        "ignoring")[1].splitlines()[0]


def test_planted_pickles_are_never_loaded(finished, tmp_path):
    """--resume/--extend read plain data (results.csv, optuna.db, trial folders): a pickle
    planted in shared storage must not run."""
    exp = _copy(finished, tmp_path, "planted")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    import pickle

    for name in ("tuner.pkl", "searcher-state-2026-01-01_00-00-00.pkl", "trainable.pkl"):
        (exp / name).write_bytes(pickle.dumps(Evil()))
    before = pd.read_csv(exp / "results.csv")
    stamps = {c: (exp / c).stat().st_mtime_ns for c in before["checkpoint"]}
    proc = _run("search.run", ["--extend", "1", "--experiment", "planted", "--storage",
                               str(tmp_path / "runs")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()
    table = pd.read_csv(exp / "results.csv")
    assert len(table) == 3  # --extend 1: the two kept, one added
    assert all((exp / c).stat().st_mtime_ns == t for c, t in stamps.items())  # not rerun
    import optuna

    from search.resume import STUDY, study_storage
    from trainables.store import ExperimentStore

    study = optuna.load_study(study_name=STUDY, storage=study_storage(ExperimentStore(exp)))
    assert len(study.trials) == 3  # the sampler saw the first two before proposing the third


def test_split_mismatch_is_refused(finished, tmp_path):
    exp = _copy(finished, tmp_path, "mixed")
    summary = json.loads((exp / "summary.json").read_text())
    summary["split_hash"] = "0123456789ab"  # as if another search's summary overwrote it
    (exp / "summary.json").write_text(json.dumps(summary))
    _one_error(_run("ensemble.build", ["--experiment", "mixed", "--storage",
                                       str(tmp_path / "runs")], tmp_path), "two searches")


def test_a_moved_experiment_still_builds_and_loads(finished, tmp_path):
    import ensemble

    moved = tmp_path / "elsewhere" / "done"
    shutil.copytree(finished["exp"], moved)
    proc = _run("ensemble.build", ["--experiment", "done", "--storage",
                                   str(tmp_path / "elsewhere"), "--top", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = tmp_path / "archive" / "done"
    shutil.move(str(moved), str(again))  # the ensemble's member paths are relative
    model = ensemble.load(again / "ensemble" / "ensemble.pt")
    assert model.predict_proba(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 3)


def test_unusable_member_checkpoints_are_named_and_left_out(finished, tmp_path):
    exp = _copy(finished, tmp_path, "broken")
    table = pd.read_csv(exp / "results.csv")
    best, second = (exp / c for c in table["checkpoint"][:2])
    best.write_bytes(best.read_bytes()[:1000])  # truncated
    proc = _run("ensemble.build", ["--experiment", "broken", "--storage",
                                   str(tmp_path / "runs"), "--top", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(best) in proc.stderr and "building without it" in proc.stderr
    second.unlink()  # deleted: now nothing is left to build from
    proc = _run("ensemble.build", ["--experiment", "broken", "--storage",
                                   str(tmp_path / "runs")], tmp_path)
    assert "missing" in proc.stderr
    _one_error(proc, "can be read")


# ---------------------------------------------------------------- failed starts and errors


def test_a_start_that_never_reached_a_trial_does_not_block_a_rerun(tmp_path):
    data = _images(tmp_path / "images", per_class=30)
    args = ["--data", str(data), "--num-samples", "1", "--max-epochs", "1", "--experiment", "s",
            "--storage", str(tmp_path / "runs"), "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}", "--image-size", "32", "--num-cpus", "2",
            "--warm-epochs", "30", "--no-refit"]
    proc = start_search(args, tmp_path)
    deadline = time.time() + 300
    while not (tmp_path / "runs" / "s" / "warm").exists():  # interrupted in its warm start
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert not (tmp_path / "runs" / "s" / "results.csv").exists()
    rerun = _run("search.run", [*args[:-3], "--warm-epochs", "1", "--no-refit"], tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "never reached its first trial" in rerun.stderr
    assert len(pd.read_csv(tmp_path / "runs" / "s" / "results.csv")) == 1


def test_storage_that_cannot_be_written_is_one_sentence(tmp_path):
    data = _images(tmp_path / "images", per_class=4)
    # sysfs refuses new folders even to root, as a read-only or foreign mount would
    proc = _run("search.run", ["--data", str(data), "--storage", "/sys/imgsearch-runs", *TINY],
                tmp_path)
    _one_error(proc, "/sys/imgsearch-runs")


def test_a_full_disk_is_one_sentence(tmp_path):
    """The storage is a real 1 MB file system (tmpfs in a private mount namespace, so no
    privileges are needed); the decoded images do not fit on it."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to mount a tiny file system without privileges")
    data = _images(tmp_path / "images", per_class=30)
    storage = tmp_path / "small"
    storage.mkdir()
    args = ["--data", str(data), "--num-samples", "1", "--max-epochs", "1", "--experiment", "f",
            "--storage", str(storage), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            *TINY, "--image-size", "64"]
    script = (f"mount -t tmpfs -o size=1m tmpfs {storage} && exec {sys.executable} -m "
              "search.run " + " ".join(args))
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if "mount" in proc.stderr and proc.returncode not in (0, 2):
        pytest.skip(f"this machine refuses a private tmpfs mount: {proc.stderr.strip()[:200]}")
    _one_error(proc, "cannot write", "the disk is full")


def test_an_address_with_no_cluster_fails_fast(tmp_path):
    tick = time.time()
    proc = _run("search.run", ["--address", "127.0.0.1:1", "--storage", str(tmp_path / "runs")],
                tmp_path)
    _one_error(proc, "cannot reach the Ray cluster at 127.0.0.1:1")
    assert time.time() - tick < 60
    assert not (tmp_path / "runs" / "default").exists()


# ---------------------------------------------------------------- a worker lost mid-trial


def _descendants(pid: int) -> list[int]:
    children = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _trial_process(search_pid: int) -> int | None:
    for pid in _descendants(search_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::ImplicitFunc"):
            return pid
    return None


def test_a_killed_trial_worker_resumes_from_its_last_epoch(tmp_path):
    """As on a lost spot instance: Tune retries the trial, which continues after its last
    finished epoch; results.csv and MLflow keep one record of it."""
    data = _images(tmp_path / "images", per_class=50)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--data", str(data), "--num-samples", "1", "--max-epochs", "6", "--space",
            "epochs=6", "--max-failures", "2", "--experiment", "k", "--storage",
            str(tmp_path / "runs"), "--tracking-uri", uri, *TINY, "--image-size", "64"]
    proc = start_search(args, tmp_path)
    lines = []
    deadline = time.time() + 400
    while not any("epoch 1/6" in ln for ln in lines):
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "".join(lines)[-3000:]
        lines.append(line)
        assert time.time() < deadline, "".join(lines)[-3000:]
    victim = _trial_process(proc.pid)
    assert victim is not None, "no trial process found"
    os.kill(victim, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=400)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "Trial task failed" in out  # the kill hit the running trial, and Tune retried it
    epochs = [ln.split(" epoch ")[1].split("/")[0] for ln in out.splitlines()
              if ln.startswith("  trial ") and " epoch " in ln]
    assert epochs.count("1") == 1, epochs  # epoch 1 was not trained again
    assert epochs[-1] == "6" and sorted(set(epochs)) == [str(e) for e in range(1, 7)]
    table = pd.read_csv(tmp_path / "runs" / "k" / "results.csv")
    assert len(table) == 1 and table["status"][0] == "completed"
    assert table["epochs_run"][0] == 6
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("k")
    trials = [r for r in client.search_runs([exp.experiment_id]) if "trial_id" in r.data.tags]
    assert len(trials) == 1
    steps = [m.step for m in client.get_metric_history(trials[0].info.run_id, "val_acc")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
