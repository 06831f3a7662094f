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
import pytest

from conftest import REPO, read_results, start_search, write_image
from trainables.checkpoint import load_checkpoint

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
    before = read_results(exp / "results.csv")
    stamps = {c: (exp / c).stat().st_mtime_ns for c in before["checkpoint"]}
    proc = _run("search.run", ["--extend", "1", "--experiment", "planted", "--storage",
                               str(tmp_path / "runs")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()
    table = read_results(exp / "results.csv")
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
    table = read_results(exp / "results.csv")
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
    assert len(read_results(tmp_path / "runs" / "s" / "results.csv")) == 1


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
    refused = proc.stderr.strip().startswith(("unshare:", "mount:"))  # before Python ran
    if refused and proc.returncode not in (0, 2):
        pytest.skip(f"this machine refuses a private tmpfs mount: {proc.stderr.strip()[:200]}")
    _one_error(proc, "cannot write", "the disk is full")


def test_an_address_with_no_cluster_fails_fast(tmp_path):
    # within seconds, not after minutes of ray.init retries: run() would time out at 600 s
    proc = _run("search.run", ["--address", "127.0.0.1:1", "--storage", str(tmp_path / "runs")],
                tmp_path)
    _one_error(proc, "cannot reach the Ray cluster at 127.0.0.1:1")
    assert not (tmp_path / "runs" / "default").exists()


# ---------------------------------------------------------------- the probe's bad input


def test_overwrite_never_deletes_the_data_it_reads(tmp_path):
    """Probe case 1: the experiment folder is the data folder."""
    data = _images(tmp_path / "store" / "mydata", per_class=4)
    proc = _run("search.run", ["--data", str(data), "--storage", str(tmp_path / "store"),
                               "--experiment", "mydata", "--overwrite", *TINY], tmp_path)
    _one_error(proc, f"--data {data} lies inside the experiment folder")
    assert len(list(data.rglob("*.png"))) == 12  # every image is still there


def test_a_search_inside_its_data_folder_is_refused(tmp_path):
    """Probe case 4: run from inside the image folder, the results (and MLflow's store) would
    become classes of the next search."""
    data = _images(tmp_path / "images", per_class=4)
    _one_error(_run("search.run", ["--data", ".", *TINY], data), "lies inside --data .",
               "--storage outside")
    _one_error(_run("search.run", ["--data", ".", "--storage", str(tmp_path / "runs"), *TINY],
                    data), "MLflow would write its store", "--tracking-uri")
    assert sorted(p.name for p in data.iterdir()) == ["c0", "c1", "c2"]  # nothing written


@pytest.mark.parametrize("uri", ["sqlite:////proc/imgsearch/mlflow.db", "/sys/imgsearch-mlruns"])
def test_an_unwritable_tracking_store_is_one_sentence(tmp_path, uri):
    """Probe case 6 (MLflow retried for 117 s, then a database traceback)."""
    data = _images(tmp_path / "images", per_class=4)
    proc = _run("search.run", ["--data", str(data), "--storage", str(tmp_path / "runs"),
                               "--tracking-uri", uri, *TINY], tmp_path)
    _one_error(proc, "cannot write the MLflow store", "--tracking-uri")
    assert not (tmp_path / "runs" / "default").exists()  # refused before anything was written


def test_storage_under_proc_is_one_sentence(tmp_path):
    """Probe case 7 (a FileNotFoundError traceback)."""
    data = _images(tmp_path / "images", per_class=4)
    _one_error(_run("search.run", ["--data", str(data), "--storage", "/proc/runs", *TINY],
                    tmp_path), "/proc", "--storage")


def test_predictions_to_an_existing_folder_are_refused(finished, tmp_path):
    """Probe case 8 (IsADirectoryError after the whole build)."""
    (tmp_path / "out").mkdir()
    proc = _run("ensemble.build", ["--experiment", "done", "--storage",
                                   str(finished["work"] / "runs"), "--predict",
                                   str(finished["work"] / "images"), "--output",
                                   str(tmp_path / "out")], tmp_path)
    _one_error(proc, "is a folder", "predictions.csv")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_bad_split_file_for_the_data_report_is_one_sentence(finished, tmp_path):
    """Probe case 9: not JSON, or JSON that is not a split."""
    images = finished["work"] / "images"
    bad = tmp_path / "split.json"
    bad.write_text("{not json")
    args = [str(images), "--out", str(tmp_path / "report"), "--split", str(bad)]
    _one_error(_run("trainables.eda", args, tmp_path), "is not JSON")
    bad.write_text(json.dumps({"train": [0, 1], "ids": ["a.png"]}))
    _one_error(_run("trainables.eda", args, tmp_path), "no image ids by part")
    good = _run("trainables.eda", [*args[:-1], str(finished["exp"] / "split.json")], tmp_path)
    assert good.returncode == 0, good.stderr[-3000:]


def test_a_moved_folder_with_its_store_builds_and_extends(finished, tmp_path):
    """Probe case 3: search in a/, `mv a b`, then ensemble.build and --extend in b/. The store
    moved with the folder is followed; the old place is not re-created."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(finished["exp"], a / "runs" / "done")
    shutil.copy(finished["work"] / "mlflow.db", a / "mlflow.db")
    doc = json.loads((a / "runs" / "done" / "mlflow.json").read_text())
    doc |= {"tracking_uri": f"sqlite:///{a / 'mlflow.db'}",  # as if the search ran in a/
            "experiment_dir": str(a / "runs" / "done")}
    (a / "runs" / "done" / "mlflow.json").write_text(json.dumps(doc))
    shutil.copytree(finished["work"] / "images", b / "images")
    shutil.move(str(a), str(b / "work"))
    store = ["--experiment", "done", "--storage", str(b / "work" / "runs")]
    built = _run("ensemble.build", [*store, "--top", "2"], b)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "moved from" in built.stderr and not a.exists()
    extended = _run("search.run", [*store, "--extend", "1"], b)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert len(read_results(b / "work" / "runs" / "done" / "results.csv")) == 3
    assert not a.exists()
    (b / "work" / "mlflow.db").unlink()  # now the store is gone: one sentence, not a new store
    _one_error(_run("ensemble.build", store, b), "no longer exists", "--tracking-uri")
    assert not (b / "work" / "mlflow.db").exists()
    given = _run("ensemble.build", [*store, "--top", "2", "--tracking-uri",  # the fix it names
                                     f"sqlite:///{b / 'new.db'}"], b)
    assert given.returncode == 0, given.stderr[-3000:]


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


def _trial_epochs(out: str) -> list[int]:
    """The epochs the driver's progress lines report, in order."""
    return [int(ln.split(" epoch ")[1].split("/")[0]) for ln in out.splitlines()
            if ln.startswith("  trial ") and " epoch " in ln]


def test_a_search_interrupted_mid_epoch_resumes_its_trial_after_the_last_epoch(tmp_path):
    """Ctrl+C while a trial is inside its third epoch, then `search.run --resume`: the trial goes
    on after its last finished epoch (not from scratch) and ends as one completed trial."""
    data = _images(tmp_path / "images", per_class=50)
    args = ["--data", str(data), "--num-samples", "1", "--max-epochs", "8", "--space",
            "epochs=8", "--experiment", "mid", "--storage", str(tmp_path / "runs"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *TINY, "--image-size",
            "64"]
    proc = start_search(args, tmp_path)
    lines: list[str] = []
    deadline = time.time() + 400
    while not any(ln.startswith("  trial ") and " epoch 2/8" in ln for ln in lines):
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "".join(lines)[-3000:]
        lines.append(line)
        assert time.time() < deadline, "".join(lines)[-3000:]
    exp = tmp_path / "runs" / "mid"
    proc.send_signal(signal.SIGINT)  # epoch 3 has begun: it is lost, epochs 1-2 are not
    rest, _ = proc.communicate(timeout=120)
    first = "".join(lines) + rest
    assert proc.returncode == 130, first[-3000:]
    saved = list(exp.rglob("resume.pt"))
    assert saved, first[-3000:]
    # the last finished epoch: the Ctrl+C's grace may let one more finish than was printed
    last = int(load_checkpoint(saved[0])["epoch"])
    assert 2 <= last < 8 and last >= max(_trial_epochs(first)), first[-3000:]

    resumed = _run("search.run", ["--resume", "--experiment", "mid", "--storage",
                                  str(tmp_path / "runs")], tmp_path)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    epochs = _trial_epochs(resumed.stdout)
    assert epochs and epochs[0] == last + 1, (last, out[-3000:])  # went on, not afresh
    assert epochs == list(range(last + 1, 9)), epochs
    table = read_results(exp / "results.csv")
    assert len(table) == 1 and table["status"][0] == "completed"
    assert table["epochs_run"][0] == 8
    assert not list(exp.rglob("resume.pt"))  # a finished trial leaves no resume state


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
    table = read_results(tmp_path / "runs" / "k" / "results.csv")
    assert len(table) == 1 and table["status"][0] == "completed"
    assert table["epochs_run"][0] == 6
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("k")
    trials = [r for r in client.search_runs([exp.experiment_id]) if "trial_id" in r.data.tags]
    assert len(trials) == 1
    steps = [m.step for m in client.get_metric_history(trials[0].info.run_id, "val_acc")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
