"""The end of a search: the best trial evaluated once on the test split, summary.json, the table."""

from __future__ import annotations

import logging
import time

import pandas as pd
import torch

from search.config import SearchConfig
from search.tracking import SearchRun
from trainables.data import ImageData
from trainables.errors import UserError
from trainables.metrics import classification_metrics
from trainables.split import Split
from trainables.store import FINISHED, ExperimentStore, code_version, ranked
from trainables.train import load_trained, predict_proba

log = logging.getLogger("search")
TABLE_COLUMNS = ["trial_id", "status", "epochs_run", "lr", "weight_decay", "batch_size",
                 "dropout", "epochs", "scheduler", "best_val_acc", "best_val_loss"]


def finish(cfg: SearchConfig, store: ExperimentStore, table: pd.DataFrame, data: ImageData,
           split: Split, run: SearchRun, start: float) -> int:
    """Evaluates the best trial once on the test split, writes summary.json, prints the table."""
    table = ranked(table)
    usable = table[table["status"].isin(FINISHED) & (table["checkpoint"] != "")]
    print_table(table)
    if usable.empty:
        run.end("FAILED")
        raise UserError(f"no trial of {cfg.experiment!r} finished (see results.csv and the "
                        "trial errors above); fix the cause and run again")
    best = usable.iloc[0]
    model, ckpt = load_trained(best["checkpoint"], torch.device("cpu"))
    probs = predict_proba(model, data.images, split.test, mean=ckpt["mean"], std=ckpt["std"])
    test = classification_metrics(probs, data.labels[split.test])
    val = {"accuracy": float(best["best_val_acc"]), "loss": float(best["best_val_loss"]),
           "f1": float(best["best_val_f1"])}
    best_row = best.to_dict() | {"checkpoint": store.relative(best["checkpoint"])}
    store.write_summary({
        "experiment": cfg.experiment, "best_trial": best_row, "val": val, "test": test,
        "split_hash": split.hash, "split_sizes": split.sizes(), "data": data.facts(),
        "trials": table["status"].value_counts().to_dict(), "wall_s": round(time.time() - start, 1),
        "mlflow": store.read_tracking(), "code": code_version(),
    })
    metrics = {f"test_{k}": v for k, v in test.items()} | {f"best_val_{k}": v
                                                          for k, v in val.items()}
    run.log_result(metrics, best["trial_id"], probs, data.labels[split.test], data.class_names)
    run.end("FINISHED")
    log.info("\nbest trial %s: val accuracy %.4f, test accuracy %.4f (macro-F1 %.4f) on %d "
             "test images; %.0f s in all\nresults: %s", best["trial_id"], val["accuracy"],
             test["accuracy"], test["f1"], len(split.test), time.time() - start,
             store.path("summary.json"))
    return 0


def print_table(table: pd.DataFrame) -> None:
    cols = [c for c in TABLE_COLUMNS if c in table.columns]
    shown = table[cols].copy()
    for c in ("lr", "weight_decay"):
        shown[c] = shown[c].map(lambda v: f"{v:.2e}" if pd.notna(v) else "")
    for c in ("dropout", "best_val_acc", "best_val_loss"):
        shown[c] = shown[c].map(lambda v: f"{v:.4f}" if pd.notna(v) else "")
    print("\ntrials, best first:\n" + shown.to_string(index=False), flush=True)
