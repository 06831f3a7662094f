"""One search from prepared inputs to results: Ray Tune run, MLflow records, final test report."""

from __future__ import annotations

import logging
import time

import pandas as pd
import torch

from search.config import SearchConfig
from search.experiment import Experiment
from search.results import (
    FINISHED,
    ProgressPrinter,
    ResultsWriter,
    ranked,
    write_atomic,
    write_json,
)
from search.tracking import (
    TrialRecorder,
    client_for,
    code_version,
    experiment_id,
    flat_params,
    log_params,
    log_prediction_pictures,
    resolve_tracking_uri,
)
from search.tune import (
    autoscaling_capacity,
    make_trainable,
    make_tuner,
    plan_resources,
    restore_tuner,
)
from trainables.checkpoint import load_checkpoint
from trainables.data import ImageData
from trainables.errors import UserError
from trainables.metrics import classification_metrics
from trainables.models import create_model, initial_state, normalization
from trainables.split import Split
from trainables.train import TrialInputs, load_trained, predict_proba

log = logging.getLogger("search")
TABLE_COLUMNS = ["trial_id", "status", "epochs_run", "lr", "weight_decay", "batch_size",
                 "dropout", "epochs", "scheduler", "best_val_acc", "best_val_loss"]


def search(cfg: SearchConfig, exp: Experiment, data: ImageData, split: Split,
           init: tuple[dict, list[float], list[float]], start: float) -> int:
    """Runs the search in `exp`; returns 0, or 130 when it was interrupted (resumable)."""
    import ray

    log.info("data: %d images, %d classes, %d px; split train/val/test %s (hash %s)",
             len(data.labels), data.num_classes, data.images.shape[1],
             "/".join(str(v) for v in split.sizes().values()), split.hash)
    init, mean, std = init
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    plan = plan_resources(cfg, ray.cluster_resources(), nodes, autoscaling_capacity())
    log.info("resources: %s", plan.describe())
    inputs = TrialInputs(data=ray.put(data), init_state=ray.put(init), train_idx=split.train,
                         val_idx=split.val, mean=mean, std=std)
    client, exp_id, parent = open_parent_run(cfg, exp, data.facts(), split)
    trainable = make_trainable(cfg, plan, inputs, exp.dir)
    if exp.resumed:
        log.info("resuming %s: finished trials are kept, unfinished ones run again", exp.dir)
        tuner = restore_tuner(exp.dir, trainable)
    else:
        recorder = TrialRecorder(
            client.tracking_uri, exp_id, parent, fixed_params=_fixed_params(cfg, plan),
            tags=code_version(), checkpoint_root=str(exp.path("checkpoints")),
            class_names=data.class_names, val_labels=data.labels[split.val].tolist())
        writer = ResultsWriter(str(exp.path("results.csv")), str(exp.path("checkpoints")))
        tuner = make_tuner(cfg, plan, trainable,
                           [recorder, writer, ProgressPrinter(cfg.num_samples)])
    tuner.fit()
    table = pd.read_csv(exp.path("results.csv"), keep_default_na=False, na_values=[""])
    table["checkpoint"] = table["checkpoint"].fillna("")
    out_of_time = cfg.time_budget_s is not None and time.time() - start >= cfg.time_budget_s
    if out_of_time:  # Tune ends running trials at the budget just as on an interrupt
        table.loc[table["status"] == "interrupted", "status"] = "stopped_by_budget"
        write_atomic(exp.path("results.csv"), table.to_csv(index=False))
    _close_open_trial_runs(client, exp_id, parent, table)
    if _interrupted(cfg, table, out_of_time):
        log.warning("search interrupted: %d of %d trials finished; continue it with "
                    "python -m search.run --resume --experiment %s --storage %s",
                    int(table["status"].isin(FINISHED).sum()), cfg.num_samples, cfg.experiment,
                    cfg.storage)
        return 130
    return finish(cfg, exp, table, data, split, client, parent, start)


def shared_init(cfg: SearchConfig, exp: Experiment, num_classes: int
                ) -> tuple[dict, list[float], list[float]]:
    """The initial weights all trials share (a resumed search reads init.pt) and normalisation."""
    path = exp.path("init.pt")
    if exp.resumed and path.is_file():
        saved = load_checkpoint(path)
        return saved["model"], saved["mean"], saved["std"]
    state = initial_state(cfg.model, num_classes, seed=cfg.seed, pretrained=cfg.pretrained,
                          pretrained_file=cfg.pretrained_file)
    mean, std = normalization(create_model(cfg.model, num_classes))
    return state, mean, std


def open_parent_run(cfg: SearchConfig, exp: Experiment, facts: dict, split: Split):
    """The search's parent MLflow run: created with config and data facts, or reopened."""
    saved = exp.tracking()
    uri = saved["tracking_uri"] if saved and not cfg.tracking_uri else \
        resolve_tracking_uri(cfg.tracking_uri)
    client = client_for(uri)
    exp_id = experiment_id(client, cfg.experiment, create=True)
    if saved:
        client.update_run(saved["parent_run_id"], status="RUNNING")
        return client, exp_id, saved["parent_run_id"]
    run = client.create_run(exp_id, run_name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"kind": "search", **code_version(),
                                  "experiment_dir": str(exp.dir)})
    params = flat_params(cfg.to_dict()) | flat_params({"data": facts}) | {
        "split_hash": split.hash, **{f"split.{k}": str(v) for k, v in split.sizes().items()}}
    log_params(client, run.info.run_id, params)
    client.log_artifact(run.info.run_id, str(exp.path("config.yaml")))
    exp.save_tracking({"tracking_uri": uri, "experiment_id": exp_id,
                       "parent_run_id": run.info.run_id})
    log.info("MLflow: %s (experiment %r); see it with: mlflow ui --backend-store-uri %s", uri,
             cfg.experiment, uri)
    return client, exp_id, run.info.run_id


def finish(cfg: SearchConfig, exp: Experiment, table: pd.DataFrame, data, split: Split,
           client, parent: str, start: float) -> int:
    """Evaluates the best trial once on the test split, writes summary.json, prints the table."""
    table = ranked(table)
    usable = table[table["status"].isin(FINISHED) & (table["checkpoint"] != "")]
    _print_table(table)
    if usable.empty:
        client.set_terminated(parent, "FAILED")
        raise UserError(f"no trial of {cfg.experiment!r} finished (see results.csv and the "
                        "trial errors above); fix the cause and run again")
    best = usable.iloc[0]
    model, ckpt = load_trained(best["checkpoint"], torch.device("cpu"))
    probs = predict_proba(model, data.images, split.test, mean=ckpt["mean"], std=ckpt["std"])
    test = classification_metrics(probs, data.labels[split.test])
    val = {"accuracy": float(best["best_val_acc"]), "loss": float(best["best_val_loss"]),
           "f1": float(best["best_val_f1"])}
    summary = {
        "experiment": cfg.experiment, "best_trial": best.to_dict(), "val": val, "test": test,
        "split_hash": split.hash, "split_sizes": split.sizes(), "data": data.facts(),
        "trials": table["status"].value_counts().to_dict(), "wall_s": round(time.time() - start, 1),
        "mlflow": exp.tracking(), "code": code_version(),
    }
    write_json(exp.path("summary.json"), summary)
    metrics = {f"test_{k}": v for k, v in test.items()} | {f"best_val_{k}": v
                                                          for k, v in val.items()}
    for k, v in metrics.items():
        client.log_metric(parent, k, v)
    client.set_tag(parent, "best_trial_id", best["trial_id"])
    log_prediction_pictures(client, parent, probs, data.labels[split.test], data.class_names,
                            "test")
    client.log_artifact(parent, str(exp.path("results.csv")))
    client.log_artifact(parent, str(exp.path("summary.json")))
    client.set_terminated(parent, "FINISHED")
    log.info("\nbest trial %s: val accuracy %.4f, test accuracy %.4f (macro-F1 %.4f) on %d "
             "test images; %.0f s in all\nresults: %s", best["trial_id"], val["accuracy"],
             test["accuracy"], test["f1"], len(split.test), time.time() - start,
             exp.path("summary.json"))
    return 0


def _print_table(table: pd.DataFrame) -> None:
    cols = [c for c in TABLE_COLUMNS if c in table.columns]
    shown = table[cols].copy()
    for c in ("lr", "weight_decay"):
        shown[c] = shown[c].map(lambda v: f"{v:.2e}" if pd.notna(v) else "")
    for c in ("dropout", "best_val_acc", "best_val_loss"):
        shown[c] = shown[c].map(lambda v: f"{v:.4f}" if pd.notna(v) else "")
    print("\ntrials, best first:\n" + shown.to_string(index=False), flush=True)


def _fixed_params(cfg: SearchConfig, plan) -> dict:
    keys = ("model", "optimizer", "augment", "hflip", "amp", "accum_steps", "label_smoothing",
            "mixup", "cutmix", "warmup_epochs", "grad_clip", "seed", "image_size")
    fixed = {k: getattr(cfg, k) for k in keys} | {"image_size": cfg.resolved_image_size}
    return fixed | {"workers_per_trial": plan.workers, "cpus_per_worker": plan.cpus_per_worker,
                    "gpus_per_worker": plan.gpus_per_worker}


def _close_open_trial_runs(client, exp_id: str, parent: str, table: pd.DataFrame) -> None:
    """Child runs Tune never reported as ended: FINISHED at the time budget, else KILLED."""
    status = dict(zip(table["trial_id"].astype(str), table["status"]))
    running = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = "
                                 f"'{parent}' and attributes.status = 'RUNNING'")
    for run in running:
        outcome = status.get(run.data.tags.get("trial_id", ""), "interrupted")
        client.set_tag(run.info.run_id, "outcome", outcome)
        client.set_terminated(run.info.run_id,
                              "FINISHED" if outcome == "stopped_by_budget" else "KILLED")


def _interrupted(cfg: SearchConfig, table: pd.DataFrame, out_of_time: bool) -> bool:
    """Trials left unfinished, or fewer trials than asked with time left, mean an interruption."""
    if out_of_time:
        return False
    ended = table["status"].isin(FINISHED + ("failed",))
    return not ended.all() or len(table) < cfg.num_samples
