"""MLflow records, written from the driver only: a parent run per search, a child run per trial.

One writer avoids sqlite's "database is locked" and keeps Tune's bookkeeping keys (done, pid,
time_*) out: only the metrics listed in `TRIAL_METRICS` are logged.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from trainables.errors import UserError

TRIAL_METRICS = ("train_loss", "val_loss", "val_acc", "val_f1", "lr", "train_images_per_s",
                 "data_wait_share", "best_val_acc", "best_val_loss", "best_val_f1")


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI made absolute, so trials and later commands find the same store.

    Order: the argument, MLFLOW_TRACKING_URI, MLflow's default (sqlite:///mlflow.db here).
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    if uri.startswith("file:") and not uri.startswith("file:///"):
        return Path(uri[len("file:"):]).expanduser().resolve().as_uri()
    if "://" not in uri:
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def client_for(uri: str):
    """An MlflowClient; a plain-folder store needs MLflow's explicit opt-in."""
    import logging

    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets INFO on import
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str, *, create: bool) -> str:
    """The MLflow experiment's id; created when asked, else a UserError listing what exists."""
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "active":
        return exp.experiment_id
    if exp is not None:
        client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    if create:
        return client.create_experiment(name)
    names = sorted(e.name for e in client.search_experiments())
    raise UserError(f"MLflow experiment {name!r} does not exist (existing: "
                    f"{', '.join(names) or 'none'}); pass --experiment with one of them")


def code_version() -> dict[str, str]:
    """The git commit of this code (and whether it had local changes), for every record."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], text=True,
                                capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], text=True, capture_output=True,
                               timeout=10).stdout.strip()
        return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"package_version": version("imgsearch")}
        except PackageNotFoundError:
            return {"package_version": "unknown"}


def flat_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys; everything becomes a string MLflow accepts."""
    out: dict[str, str] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and prefix == "":
            out.update(flat_params(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return out


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    new = [Param(k, v[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100])


class TrialRecorder(Callback):
    """Tune callback on the driver: one nested MLflow run per trial, metrics per epoch."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 fixed_params: dict[str, Any], tags: dict[str, str], checkpoint_root: str,
                 class_names: list[str], val_labels: list[int]) -> None:
        self.uri, self.exp_id, self.parent = tracking_uri, experiment_id, parent_run_id
        self.fixed, self.tags = fixed_params, tags
        self.checkpoint_root, self.class_names, self.val_labels = (checkpoint_root, class_names,
                                                                   val_labels)
        self._client = None
        self._runs: dict[str, str] = {}

    def __getstate__(self) -> dict:  # pickled with the experiment for resume; no live client
        state = self.__dict__.copy()
        state.update(_client=None, _runs={})
        return state

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    def run_id(self, trial) -> str:
        """The trial's child run, found by tag after a resume, created on first sight."""
        tid = trial.trial_id
        if tid not in self._runs:
            found = self.client.search_runs(
                [self.exp_id], filter_string=f"tags.trial_id = '{tid}' and "
                f"tags.`mlflow.parentRunId` = '{self.parent}'", max_results=1)
            if found:
                self._runs[tid] = found[0].info.run_id
            else:
                run = self.client.create_run(self.exp_id, run_name=f"trial-{tid}", tags={
                    "mlflow.parentRunId": self.parent, "trial_id": tid, **self.tags})
                self._runs[tid] = run.info.run_id
        return self._runs[tid]

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        run_id = self.run_id(trial)
        self.client.update_run(run_id, status="RUNNING")
        log_params(self.client, run_id, flat_params({**self.fixed, **trial.config}))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        from mlflow.entities import Metric

        step = int(result.get("training_iteration", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, step) for k in TRIAL_METRICS if k in result]
        self.client.log_batch(self.run_id(trial), metrics=metrics)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        run_id = self.run_id(trial)
        last = trial.last_result or {}
        epochs_run = int(last.get("training_iteration", 0))
        planned = int(trial.config.get("epochs", self.fixed.get("epochs", epochs_run)))
        self.client.set_tag(run_id, "outcome",
                            "completed" if epochs_run >= planned else "stopped_early")
        self.client.set_tag(run_id, "epochs_run", str(epochs_run))
        ckpt = Path(self.checkpoint_root) / trial.trial_id / "best.pt"
        if ckpt.is_file():
            self.client.set_tag(run_id, "checkpoint_path", str(ckpt))
            log_val_pictures(self.client, run_id, ckpt, self.class_names, self.val_labels)
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, "outcome", "failed")
        self.client.set_terminated(run_id, "FAILED")


def log_val_pictures(client, run_id: str, checkpoint: Path, class_names: list[str],
                     labels: list[int], split: str = "val") -> None:
    """Confusion matrix picture and per-class report of a checkpoint's stored val predictions."""
    import numpy as np

    from trainables.checkpoint import load_checkpoint

    probs = load_checkpoint(checkpoint)["val_probs"].numpy()
    log_prediction_pictures(client, run_id, probs, np.asarray(labels), class_names, split)


def log_prediction_pictures(client, run_id: str, probs, labels, class_names: list[str],
                            split: str) -> None:
    """Logs `confusion_matrix_<split>.png` and `classification_report_<split>.txt`."""
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import classification_report

    from trainables.metrics import confusion_figure

    fig = confusion_figure(probs, labels, class_names, f"{split} confusion matrix")
    client.log_figure(run_id, fig, f"confusion_matrix_{split}.png")
    plt.close(fig)
    report = classification_report(labels, probs.argmax(1), labels=np.arange(len(class_names)),
                                   target_names=class_names, digits=4, zero_division=0)
    client.log_text(run_id, report, f"classification_report_{split}.txt")
