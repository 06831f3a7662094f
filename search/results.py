"""The results table (`results.csv`, one row per trial) kept current from Tune's trials, and the
progress lines printed while a search runs (Tune callbacks on the driver)."""

from __future__ import annotations

import time

import pandas as pd
from ray.tune import Callback

from search.space import training_values
from trainables.store import ExperimentStore, outcome, ranked, resume_path, score_column

SEARCHED = ("lr", "weight_decay", "batch_size", "dropout", "epochs", "scheduler")
TABLE_COLUMNS = ["trial_id", "status", "epochs_run", "model", "lr", "weight_decay", "batch_size",
                 "dropout", "epochs", "scheduler", "best_val_acc", "best_val_f1",
                 "best_val_loss"]
STATUS_EVERY_S = 60.0  # a search's status line, at least this often
BEST = ("best_val_acc", "best_val_loss", "best_val_f1", "best_epoch")


def trial_rows(trials: list, store: ExperimentStore, ended: dict[str, str] | None = None
               ) -> pd.DataFrame:
    """One row per Tune trial: its config, outcome, epochs run, best val metrics, checkpoint.

    `ended` maps trial ids to the Tune status they are about to get (callbacks see it late).
    """
    rows = []
    for t in trials:
        last = t.last_result or {}
        epochs_run = epochs_of(last)
        planned = int(t.config.get("epochs", epochs_run) or 0)
        status = (ended or {}).get(t.trial_id, t.status)
        if status == "ERROR":
            result = "failed"
        elif status == "TERMINATED":
            result = outcome(epochs_run, planned)
        else:
            result = status.lower()
        ckpt = store.checkpoint(t.trial_id)
        rows.append({
            "trial_id": t.trial_id,
            "status": result,
            "epochs_run": epochs_run,
            **{k: t.config.get(k) for k in SEARCHED},
            **{k: v for k, v in training_values(t.config).items() if k not in SEARCHED},
            **{k: last.get(k) for k in BEST},
            "started_at": _started(last),
            "ended_at": last.get("timestamp"),
            "node_ip": last.get("node_ip"),
            "node_id": last.get("node_id"),
            "gpu_ids": last.get("gpu_ids"),
            "checkpoint": str(ckpt) if ckpt.is_file() else "",
        })
    return pd.DataFrame(rows)


def epochs_of(result: dict) -> int:
    """Epochs a trial has run: its own epoch count (Tune's iteration count restarts when a failed
    trial is retried, while the trial resumes at its last finished epoch)."""
    return int(result.get("epoch", result.get("training_iteration", 0)) or 0)


def _started(last: dict) -> float | None:
    """Unix time the trial started: its last report's time minus its running time."""
    if "timestamp" not in last or "time_total_s" not in last:
        return None
    return round(float(last["timestamp"]) - float(last["time_total_s"]), 3)


def settle(store: ExperimentStore, out_of_time: bool) -> pd.DataFrame:
    """The table after Tune returned: trials the time budget ended are marked so, not as
    interrupted (Tune ends them at the budget exactly as on an interrupt)."""
    table = store.read_results()
    if out_of_time and (table["status"] == "interrupted").any():
        table.loc[table["status"] == "interrupted", "status"] = "stopped_by_budget"
        store.write_results(table)
    return table


class ResultsWriter(Callback):
    """Keeps `results.csv` current as trials end, so an interrupted search still has one.

    A trial counts as ended only when Tune reported it complete or failed in this run; a trial
    Tune merely cleaned up on an interrupt is marked `interrupted`, since a continued search runs
    it again. Rows of trials that ended in earlier runs of a continued search (`earlier`) stay.
    """

    def __init__(self, store: ExperimentStore, metric: str = "accuracy",
                 earlier: pd.DataFrame | None = None) -> None:
        self.store, self.metric = store, metric
        self.earlier = earlier if earlier is not None else pd.DataFrame()
        self.ended: dict[str, str] = {}

    def _write(self, trials: list) -> None:
        status = {t.trial_id: self.ended.get(t.trial_id, "INTERRUPTED" if t.status in (
            "TERMINATED", "ERROR") else t.status) for t in trials}
        rows = trial_rows(trials, self.store, status)
        table = pd.concat([self.earlier, rows], ignore_index=True) if len(self.earlier) else rows
        self.store.write_results(ranked(table, self.metric))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.ended[trial.trial_id] = "TERMINATED"
        # an ended trial keeps no resume state: Tune ends a trial at its last report, so the
        # training loop's own clean-up after it never runs (each trial left its optimizer state)
        resume_path(self.store.checkpoint(trial.trial_id)).unlink(missing_ok=True)
        self._write(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.ended[trial.trial_id] = "ERROR"
        self._write(trials)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._write(trials)


class ProgressPrinter(Callback):
    """One short line per trial epoch and per trial end, instead of Tune's large tables; and a
    status line (time used and left, trials finished / running / planned, the best so far) at
    each trial's end and at least every STATUS_EVERY_S."""

    def __init__(self, num_samples: int, ended: int = 0, clock=None,
                 metric: str = "accuracy") -> None:
        self.num_samples, self.ended, self.clock = num_samples, ended, clock
        self.score, self.metric = score_column(metric), metric
        self.best: tuple[float, str] | None = None
        self.last_status = time.time()

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self.clock is not None and time.time() - self.last_status >= STATUS_EVERY_S:
            self.status(trials)

    def status(self, trials: list, ended=None) -> None:
        """`ended`: a trial Tune reports as ended while its status still says RUNNING."""
        running = sum(t.status == "RUNNING" and t is not ended for t in trials)
        best = "" if self.best is None else \
            f"; best val {self.metric} {self.best[0]:.4f} (trial {self.best[1]})"
        print(self.clock.line("search", f"trials: {self.ended} finished, {running} running of "
                                        f"{self.num_samples} planned{best}"), flush=True)
        self.last_status = time.time()

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        score = result.get(self.score)
        if score is not None and (self.best is None or score > self.best[0]):
            self.best = (float(score), trial.trial_id)
        epochs = trial.config.get("epochs", "?")
        print(f"  trial {trial.trial_id} epoch {epochs_of(result)}/{epochs}: "
              f"val acc {result.get('val_acc', float('nan')):.4f} "
              f"F1 {result.get('val_f1', float('nan')):.4f} "
              f"loss {result.get('val_loss', float('nan')):.4f} "
              f"({result.get('train_images_per_s', 0):.0f} img/s)", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.ended += 1
        last = trial.last_result or {}
        print(f"trial {trial.trial_id} ended after {epochs_of(last)} epoch(s): "
              f"best val acc {last.get('best_val_acc', float('nan')):.4f} "
              f"[{self.ended}/{self.num_samples} trials]", flush=True)
        if self.clock is not None:
            self.status(trials, ended=trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.ended += 1
        print(f"trial {trial.trial_id} failed (see {trial.local_path}/error.txt) "
              f"[{self.ended}/{self.num_samples} trials]", flush=True)


def print_table(table: pd.DataFrame) -> None:
    """The trials, best first, as the user sees them at the end of a search."""
    cols = [c for c in TABLE_COLUMNS if c in table.columns]
    shown = table[cols].copy()
    for c in ("lr", "weight_decay"):
        shown[c] = shown[c].map(lambda v: f"{v:.2e}" if pd.notna(v) else "")
    for c in ("dropout", "best_val_acc", "best_val_f1", "best_val_loss"):
        shown[c] = shown[c].map(lambda v: f"{v:.4f}" if pd.notna(v) else "")
    print("\ntrials, best first:\n" + shown.to_string(index=False), flush=True)
