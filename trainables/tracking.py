"""MLflow helpers without Ray: the tracking URI, clients, experiments, params and pictures.

Used by the search (from the driver only: one writer avoids sqlite's "database is locked") and by
the ensemble build.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trainables.errors import UserError


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
