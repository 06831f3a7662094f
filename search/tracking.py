"""The search's MLflow records, written from the driver only: a parent run per search and a
nested child run per trial (a Tune callback).

Only the metrics in `TRIAL_METRICS` are logged, which keeps Tune's bookkeeping keys (done, pid,
time_*) out of the runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback

from search.results import epochs_of
from search.space import training_values
from trainables.errors import UserError
from trainables.split import Split
from trainables.store import ExperimentStore, code_version, outcome, score_column
from trainables.tracking import (
    client_for,
    dataset_entity,
    experiment_id,
    flat_params,
    log_dataset,
    log_params,
    log_prediction_pictures,
    log_val_pictures,
    resolve_tracking_uri,
    save_runs_view,
    ui_address,
)

log = logging.getLogger("search")
VIEW_NAME = "search: searched params and val score"  # the runs-page view each search saves

TRIAL_METRICS = ("train_loss", "val_loss", "val_acc", "val_f1", "lr", "train_images_per_s",
                 "data_wait_share", "peak_memory_mb", "best_val_acc", "best_val_loss",
                 "best_val_f1")


class TrialRecorder(Callback):
    """Tune callback on the driver: one nested MLflow run per trial, metrics per epoch."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 fixed_params: dict[str, Any], store: ExperimentStore, class_names: list[str],
                 val_labels: list[int]) -> None:
        self.uri, self.exp_id, self.parent = tracking_uri, experiment_id, parent_run_id
        self.fixed, self.tags, self.store = fixed_params, code_version(), store
        self.class_names, self.val_labels = class_names, val_labels
        self.dataset = None  # the search's MLflow dataset record, attached to every trial run
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
                if self.dataset is not None:
                    log_dataset(self.client, run.info.run_id, self.dataset)
        return self._runs[tid]

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._adopt(trial)
        run_id = self.run_id(trial)
        self.client.update_run(run_id, status="RUNNING")
        log_params(self.client, run_id, flat_params({**self.fixed,
                                                     **training_values(trial.config)}))

    def _adopt(self, trial) -> None:
        """A trial that continues an interrupted one (same config) takes over its run, so the
        search keeps one record per trial and the curves go on where they stopped."""
        from search.resume import config_key

        old = self.store.read_adoptions().get(config_key(trial.config))
        if not old or old == trial.trial_id or trial.trial_id in self._runs:
            return
        found = self.client.search_runs(
            [self.exp_id], filter_string=f"tags.trial_id = '{old}' and "
            f"tags.`mlflow.parentRunId` = '{self.parent}'", max_results=1)
        if found:
            self.client.set_tag(found[0].info.run_id, "trial_id", trial.trial_id)
            self.client.set_tag(found[0].info.run_id, "continues", old)
            self._runs[trial.trial_id] = found[0].info.run_id

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        from mlflow.entities import Metric

        step = epochs_of(result)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, step) for k in TRIAL_METRICS if k in result]
        self.client.log_batch(self.run_id(trial), metrics=metrics)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        run_id = self.run_id(trial)
        last = trial.last_result or {}
        epochs_run = epochs_of(last)
        planned = int(trial.config.get("epochs", self.fixed.get("epochs", epochs_run)))
        self.client.set_tag(run_id, "outcome", outcome(epochs_run, planned))
        self.client.set_tag(run_id, "epochs_run", str(epochs_run))
        ckpt = self.store.checkpoint(trial.trial_id)
        if ckpt.is_file():
            self.client.set_tag(run_id, "checkpoint_path", str(ckpt))
            log_val_pictures(self.client, run_id, ckpt, self.class_names, self.val_labels)
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, "outcome", "failed")
        self.client.set_terminated(run_id, "FAILED")


class SearchRun:
    """The search's parent MLflow run: created with the config and data facts, or reopened."""

    def __init__(self, uri: str, experiment: str, store: ExperimentStore) -> None:
        self.uri, self.store = uri, store
        self.client = client_for(uri)
        self.exp_id = experiment_id(self.client, experiment, create=True)
        self.run_id = ""
        self.created = False  # a new run (a continued search reopens its own)

    @classmethod
    def open(cls, tracking_uri: str | None, experiment: str, store: ExperimentStore,
             params: dict[str, str]) -> SearchRun:
        """Reopens the run a resumed search started, or creates it and logs `params`."""
        saved = store.read_tracking(follow=not tracking_uri)
        uri = saved["tracking_uri"] if saved and not tracking_uri else \
            resolve_tracking_uri(tracking_uri)
        run = cls(uri, experiment, store)
        run.dataset = search_dataset(params)
        if saved:
            from mlflow.exceptions import MlflowException

            run.run_id = saved["parent_run_id"]
            try:
                run.client.update_run(run.run_id, status="RUNNING")
            except MlflowException:
                raise UserError(f"the MLflow store {uri} holds no run {run.run_id} of this "
                                "search; pass the --tracking-uri the search was started with"
                                ) from None
            return run
        created = run.client.create_run(
            run.exp_id, run_name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"kind": "search", **code_version(), "experiment_dir": str(store.dir)})
        run.run_id, run.created = created.info.run_id, True
        log_params(run.client, run.run_id, params)
        run.client.log_artifact(run.run_id, str(store.path("config.yaml")))
        store.write_tracking({"tracking_uri": uri, "experiment_id": run.exp_id,
                              "parent_run_id": run.run_id})
        run.describe()
        return run

    def describe(self) -> None:
        """What the UI shows beside the numbers: the dataset and a saved runs-table view of the
        searched params and the val score."""
        log_dataset(self.client, self.run_id, self.dataset)
        doc = self.store.read_config()
        searched = [k for k, v in (doc.get("space") or {}).items() if isinstance(v, (dict, list))]
        score = score_column(self.store.metric)
        view = save_runs_view(
            self.client, self.exp_id, "imgsearch", VIEW_NAME,
            [f"params.`{k}`" for k in searched] + [f"metrics.`{score}`", "metrics.`best_val_loss`"],
            f"metrics.`{score}`", expanded=[self.run_id], charts=search_charts(searched, score))
        log.info("MLflow: %s opens the runs in the model-training view, the searched params and "
                 "%s as columns and charts (view %r)", ui_address(self.uri, self.exp_id, view),
                 score, VIEW_NAME)

    def trial_recorder(self, fixed_params: dict[str, Any], class_names: list[str],
                       val_labels: list[int]) -> TrialRecorder:
        recorder = TrialRecorder(self.uri, self.exp_id, self.run_id, fixed_params, self.store,
                                 class_names, val_labels)
        recorder.dataset = self.dataset
        return recorder

    def log_stage(self, name: str, reports: list[dict], params: dict[str, Any]) -> str:
        """A nested run for a stage that is not a trial (the warm start, the refit): its facts
        as params and its per-epoch reports as metric curves."""
        from mlflow.entities import Metric

        run = self.client.create_run(self.exp_id, run_name=name, tags={
            "mlflow.parentRunId": self.run_id, "kind": name, **code_version()})
        rid = run.info.run_id
        log_params(self.client, rid, flat_params(params))
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(r[k]), now, epochs_of(r)) for r in reports
                   for k in TRIAL_METRICS if k in r]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(rid, metrics=metrics[i:i + 500])
        self.client.set_terminated(rid, "FINISHED")
        return rid

    def close_open_trial_runs(self, table: pd.DataFrame) -> None:
        """Child runs Tune never reported as ended: FINISHED at the time budget, else KILLED."""
        status = dict(zip(table["trial_id"].astype(str), table["status"]))
        running = self.client.search_runs(
            [self.exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}' and "
            "attributes.status = 'RUNNING'")
        for child in running:
            ended = status.get(child.data.tags.get("trial_id", ""), "interrupted")
            self.client.set_tag(child.info.run_id, "outcome", ended)
            self.client.set_terminated(child.info.run_id,
                                       "FINISHED" if ended == "stopped_by_budget" else "KILLED")

    def log_result(self, metrics: dict[str, float], best_trial: str | None, probs, labels,
                   class_names: list[str]) -> None:
        """The best trial's val and test figures (a --recipe-only run has no trial), the final
        model's test confusion matrix, results files."""
        for k, v in metrics.items():
            self.client.log_metric(self.run_id, k, v)
        if best_trial is not None:
            self.client.set_tag(self.run_id, "best_trial_id", best_trial)
        log_prediction_pictures(self.client, self.run_id, probs, labels, class_names, "test")
        for name in ("results.csv", "summary.json"):
            if self.store.path(name).is_file():
                self.client.log_artifact(self.run_id, str(self.store.path(name)))

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def search_params(cfg_doc: dict, facts: dict, split: Split) -> dict[str, str]:
    """The parent run's params: the resolved config, data facts and the split."""
    return flat_params(cfg_doc) | flat_params({"data": facts}) | {
        "split_hash": split.hash, **{f"split.{k}": str(v) for k, v in split.sizes().items()}}


def search_dataset(params: dict[str, str]):
    """The search's MLflow dataset record, from its parent run's params: the data's source,
    the split hash as digest, image and class counts and the images per part as profile."""
    source = params.get("data.source", "")
    profile = {k: int(params[f"data.{k}"]) for k in ("num_images", "num_classes", "image_size")
               if f"data.{k}" in params}
    profile |= {k: int(params[f"split.{k}"]) for k in ("train", "val", "test")}
    return dataset_entity(Path(source).name or source, source, params["split_hash"], profile)


def search_charts(searched: list[str], score: str) -> list[dict]:
    """The view's first charts: the searched params against the val score (parallel
    coordinates), the score per run, then the val and train curves per epoch."""
    line = {"type": "LINE", "xAxisKey": "step", "scaleType": "linear", "lineSmoothness": 0,
            "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True}
    return [{"type": "PARALLEL", "selectedParams": searched, "selectedMetrics": [score],
             "showAllRuns": True}, {"type": "BAR", "metricKey": score},
            *({**line, "metricKey": k, "selectedMetricKeys": [k]}
              for k in ("val_acc", "val_loss", "train_loss"))]
