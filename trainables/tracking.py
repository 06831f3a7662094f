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
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):]).expanduser().resolve()
        _check_writable(path.parent, uri, db=path)
        return "sqlite:///" + str(path)
    if uri.startswith("file:") or "://" not in uri:
        path = Path(uri[len("file://"):] if uri.startswith("file://") else
                    uri[len("file:"):] if uri.startswith("file:") else uri).expanduser().resolve()
        _check_writable(path, uri)
        return path.as_uri()
    return uri


def _check_writable(folder: Path, uri: str, db: Path | None = None) -> None:
    """One sentence, at once, when a local MLflow store cannot be written (MLflow itself
    retries for minutes, then fails with a database traceback)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        if db is not None and db.exists():
            with open(db, "ab"):
                pass
    except OSError as exc:
        raise UserError(f"cannot write the MLflow store {uri} ({exc.strerror or exc} at "
                        f"{exc.filename or folder}); pass a writable --tracking-uri or set "
                        "MLFLOW_TRACKING_URI") from None


def client_for(uri: str):
    """An MlflowClient; a plain-folder store needs MLflow's explicit opt-in."""
    import logging

    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets INFO on import
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


# The kind MLflow records for a model-training experiment (its experiment-kind selector and
# MLflow versions without 3.17's global GenAI / Model training switch read it); 3.17's UI itself
# follows that switch, which `ui_address` sets.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(client, name: str, *, create: bool) -> str:
    """The MLflow experiment's id; created when asked, else a UserError listing what exists.
    Either way it is marked as a model-training experiment (a kind a user set is kept)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND[0] not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    if create:
        return client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
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

    from trainables.checkpoint import Checkpoint

    probs = Checkpoint.load(checkpoint).val_probs
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


def check_model_name(name: str) -> str:
    """A --register name checked before any work is done (MLflow's own rules: not empty, no '/'
    or ':', no path tricks), so a typo does not cost a finished search its model."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException:
        raise UserError(f"--register {name!r} is not a valid MLflow model name; use letters, "
                        "digits, '-', '_' or '.', without '/' or ':'") from None
    return name


def dataset_entity(name: str, source: str, digest: str, profile: dict[str, Any]):
    """An MLflow dataset record (no data is uploaded): where the images came from, the split
    hash as its digest (equal digests mean the same split), counts as its profile, and the
    decoded arrays' shapes as its schema."""
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset
    from mlflow.types.schema import Schema, TensorSpec

    path = Path(source).expanduser()
    kind, uri = ("local", str(path.resolve())) if path.exists() else ("code", source)
    side = int(profile.get("image_size", -1))
    schema = TensorDatasetSchema(
        features=Schema([TensorSpec(np.dtype("uint8"), (-1, side, side, 3), "image")]),
        targets=Schema([TensorSpec(np.dtype("int64"), (-1,), "label")]))
    return Dataset(name=name, digest=digest[:36], source_type=kind,
                   source=json.dumps({"uri": uri}), schema=json.dumps(schema.to_dict()),
                   profile=json.dumps(profile))


def log_dataset(client, run_id: str, dataset, context: str = "training") -> None:
    """Attaches `dataset` to a run: the UI's Datasets column and dataset drawer show it."""
    from mlflow.entities import DatasetInput, InputTag

    client.log_inputs(run_id, datasets=[DatasetInput(
        dataset, tags=[InputTag("mlflow.data.context", context)])])


VIEW_TAG = "mlflow.sharedViewState."  # the UI's saved views of the runs table, one tag each


def save_runs_view(client, exp_id: str, view_id: str, name: str, columns: list[str],
                   order_by: str, expanded: list[str] = (), charts: list[dict] = ()) -> str:
    """Saves a runs-page view (columns shown, sort order, parents expanded, the first charts)
    in the experiment.

    MLflow keeps no per-experiment default columns: the table opens on Source, Models and
    Dataset until a user picks more (kept in the browser), and the chart view on every metric
    in alphabetical order. A saved view is the one thing a program can add: it is listed in the
    runs page's view menu and opens from `?viewStateShareKey=<view_id>`. `charts` are card
    configs as the UI serialises them (type, metricKey, ...); MLflow appends charts of the other
    metrics after them. Returns the query string.
    """
    import time

    defaults = [f"attributes.`{c}`" for c in ("Source", "Models", "Dataset")]
    state = {"selectedColumns": defaults + columns, "runsExpanded": dict.fromkeys(expanded, True),
             "orderByKey": order_by, "orderByAsc": False, "runsHiddenMode": "SHOW_ALL"}
    if charts:  # the UI expects its two built-in sections last: model metrics, system metrics
        sections = [{"uuid": f"{view_id}-{k}", "name": f"{k.title()} metrics", "display": True,
                     "isReordered": k == "model", "deleted": False, "isGenerated": True}
                    for k in ("model", "system")]
        state |= {"compareRunSections": sections, "isAccordionReordered": False,
                  "compareRunCharts": [{"uuid": f"{view_id}-chart-{i}", "deleted": False,
                                        "isGenerated": False, "runsCountToCompare": 100,
                                        "metricSectionId": f"{view_id}-model", **c}
                                       for i, c in enumerate(charts)]}
    envelope = {"name": name, "createdAt": int(time.time() * 1000), "state": json.dumps(state)}
    client.set_experiment_tag(exp_id, VIEW_TAG + view_id, json.dumps(envelope))
    return f"?viewStateShareKey={view_id}"


def ui_address(uri: str, exp_id: str, query: str = "") -> str:
    """Where the experiment's runs open in MLflow's UI in its model-training view: MLflow 3.17
    shows the view its GenAI / Model training switch selects (kept per browser, GenAI at first,
    whatever the experiment's kind tag says), and `workflowType` in the address sets it."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else \
        "http://127.0.0.1:5000"  # what `mlflow ui` serves
    extra = "&" + query.lstrip("?") if query else ""
    return f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning{extra}"
