"""The end of a search: the best trial evaluated once on test, the refit on train + val,
summary.json, the table, the parent run's figures."""

from __future__ import annotations

import logging
import time

import pandas as pd
import torch

from search.start import starts_record
from trainables.errors import UserError
from trainables.metrics import classification_metrics
from trainables.store import FINISHED, code_version, ranked
from trainables.train import load_trained, predict_proba

log = logging.getLogger("search")
TABLE_COLUMNS = ["trial_id", "status", "epochs_run", "model", "lr", "weight_decay", "batch_size",
                 "dropout", "epochs", "scheduler", "best_val_acc", "best_val_f1",
                 "best_val_loss"]


def finish(r, table: pd.DataFrame) -> int:
    """Evaluates the val-selected trial on test, refits it on train + val, writes summary.json
    and the parent run's record, prints the table. `r` is the `search.run.Run`."""
    cfg, store, data, split = r.cfg, r.store, r.data, r.split
    table = ranked(table, cfg.train.metric)
    usable = table[table["status"].isin(FINISHED) & (table["checkpoint"] != "")]
    print_table(table)
    if usable.empty:
        r.mlflow.end("FAILED")
        raise UserError(f"no trial of {cfg.experiment!r} finished{_first_error(store)}; fix "
                        "the cause and run again (results.csv and the trial errors above say "
                        "more)")
    best = usable.iloc[0]
    model, ckpt = load_trained(best["checkpoint"], torch.device("cpu"))
    probs = predict_proba(model, data.images, split.test, mean=ckpt["mean"], std=ckpt["std"])
    test = classification_metrics(probs, data.labels[split.test])
    val = {"accuracy": float(best["best_val_acc"]), "loss": float(best["best_val_loss"]),
           "f1": float(best["best_val_f1"])}
    refit, final_probs = _refit(r, best["checkpoint"])
    front = _study_pictures_and_front(r)
    final = {"model": "refit" if refit else "best trial",
             "checkpoint": refit["checkpoint"] if refit else store.relative(best["checkpoint"]),
             "test": refit["test"] if refit else test}
    store.write_summary({
        "experiment": cfg.experiment, "best_trial": best.to_dict() | {
            "checkpoint": store.relative(best["checkpoint"])},
        "val": val, "test": test, "refit": refit, "final": final, "start": starts_record(r.starts),
        "budget": r.budget.__dict__ if r.budget else None,
        "pareto": front,
        "split_hash": split.hash, "split_sizes": split.sizes(), "data": data.facts(),
        "trials": table["status"].value_counts().to_dict(),
        "wall_s": round(time.time() - r.t0, 1), "mlflow": store.read_tracking(),
        "code": code_version(),
    })
    metrics = {f"test_{k}": v for k, v in final["test"].items()} | {
        f"trial_test_{k}": v for k, v in test.items()} | {
        f"best_val_{k}": v for k, v in val.items()}
    r.mlflow.log_result(metrics, best["trial_id"], final_probs if refit else probs,
                        data.labels[split.test], data.class_names)
    _explain_and_register(r, best["checkpoint"], final)
    r.mlflow.end("FINISHED")
    lines = [f"\nbest trial {best['trial_id']} (chosen on val, {cfg.train.metric}): val "
             f"accuracy {val['accuracy']:.4f}, test accuracy {test['accuracy']:.4f} (macro-F1 "
             f"{test['f1']:.4f}) on {len(split.test)} test images"]
    if refit:
        lines.append(f"refit on train + val ({refit['train_images']} images, final model): test "
                     f"accuracy {refit['test']['accuracy']:.4f} (macro-F1 "
                     f"{refit['test']['f1']:.4f}), {refit['checkpoint']}")
    lines.append(f"{time.time() - r.t0:.0f} s in all; results: {store.path('summary.json')}")
    log.info("\n".join(lines))
    return 0


def _study_pictures_and_front(r) -> list[dict] | None:
    """The study's pictures (plots/, and in the parent run); for a multi-objective search the
    Pareto front, printed and saved as pareto.csv."""
    from search.study import describe_front, draw, objective_names, pareto_front

    for path in draw(r.cfg, r.store):
        r.mlflow.client.log_artifact(r.mlflow.run_id, str(path), "plots")
    front = pareto_front(r.cfg, r.store)
    if front is None:
        return None
    names = objective_names(r.cfg)
    log.info("Pareto front (%s), %d trial(s), saved as %s:\n%s", " against ".join(names),
             len(front), r.store.path("pareto.csv"), describe_front(front, names))
    r.mlflow.client.log_artifact(r.mlflow.run_id, str(r.store.path("pareto.csv")))
    return front[["trial_id", *names]].to_dict("records")


def _explain_and_register(r, best_checkpoint: str, final: dict) -> None:
    """The best trial's model report, in the experiment folder and the parent run; with
    --register, the final model (the refit, else the best trial) as a registered version."""
    from ensemble.explain import explain_checkpoint

    start, out = time.time(), r.store.model_report_dir("best_trial")
    explain_checkpoint(best_checkpoint, r.data, out, "best trial")
    r.mlflow.client.log_artifacts(r.mlflow.run_id, str(out), "model_report/best_trial")
    log.info("model report: %s (%.1f s)", out / "report.md", time.time() - start)
    if r.cfg.register:
        from ensemble.pyfunc import describe, register

        version = register(r.store.resolve(final["checkpoint"]), name=r.cfg.register,
                           uri=r.mlflow.uri, run_id=r.mlflow.run_id,
                           examples=r.data.images[r.split.test[:2]],
                           description=describe(final["model"], r.cfg.experiment,
                                                r.data.class_names, final["test"]))
        log.info("registered %r version %d (%s); serve it with: MLFLOW_TRACKING_URI=%s mlflow "
                 "models serve -m models:/%s/%d --env-manager local", r.cfg.register, version,
                 final["model"], r.mlflow.uri, r.cfg.register, version)


def _refit(r, selected: str):
    """The refit's record and test probabilities, or (None, None) when it is off or the budget
    has no time left for it."""
    from search.refit import refit

    if not r.cfg.refit:
        return None, None
    left = r.seconds_left()
    if left is not None and r.budget is not None and left < r.budget.refit_s * 0.8:
        log.warning("no time left in --time-budget %s for the refit (%.0f s left, it needs about "
                    "%.0f s): the val-selected trial is the final model", r.cfg.time_budget,
                    max(left, 0), r.budget.refit_s)
        return None, None
    record, probs, reports = refit(r.store, r.data, r.split, r.starts, selected, r.plan,
                                   list(r.cfg.plugins))
    if reports:
        r.mlflow.log_stage("refit", reports, {k: v for k, v in record.items() if k != "test"}
                           | {f"test_{k}": v for k, v in record["test"].items()})
    return record, probs


def _first_error(store) -> str:
    """': trial X failed with <its last error line>', from Tune's error files, if any."""
    for path in sorted(store.dir.glob("trial_*/error.txt")):
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return f": trial {path.parent.name.removeprefix('trial_')} failed with {lines[-1]}"
    return ""


def print_table(table: pd.DataFrame) -> None:
    cols = [c for c in TABLE_COLUMNS if c in table.columns]
    shown = table[cols].copy()
    for c in ("lr", "weight_decay"):
        shown[c] = shown[c].map(lambda v: f"{v:.2e}" if pd.notna(v) else "")
    for c in ("dropout", "best_val_acc", "best_val_f1", "best_val_loss"):
        shown[c] = shown[c].map(lambda v: f"{v:.4f}" if pd.notna(v) else "")
    print("\ntrials, best first:\n" + shown.to_string(index=False), flush=True)
