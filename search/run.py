"""`python -m search.run`: data -> split -> shared start -> Optuna/ASHA search on Ray Tune ->
refit -> MLflow -> results."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass

from search.config import SearchConfig, parse_config
from search.experiment import Experiment
from trainables.cli import run_main, start_ray
from trainables.data import ImageData
from trainables.split import Split
from trainables.store import ENDED, FINISHED

log = logging.getLogger("search")


@dataclass
class Run:
    """One search as it runs: what every phase reads and what it has produced so far."""

    cfg: SearchConfig
    exp: Experiment
    data: ImageData
    split: Split
    starts: dict  # architecture -> search.start.Start: the weights its trials load
    plan: object  # search.resources.ResourcePlan
    t0: float  # when the command started
    budget: object = None  # search.budget.BudgetPlan, with --time-budget
    mlflow: object = None  # search.tracking.SearchRun
    deadline: float = math.inf  # when the search phase must end (time.time())

    @property
    def store(self):
        return self.exp.store

    def seconds_left(self) -> float | None:
        budget = self.cfg.budget_s
        return None if budget is None else budget - (time.time() - self.t0)


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes end in one sentence and exit code 2, never a traceback."""
    return run_main(lambda: run(parse_config(argv)))


def run(cfg: SearchConfig) -> int:
    """Runs (or resumes) one search and writes its results; returns the exit code."""
    from search.resources import plan_for_cluster
    from search.start import base_starts

    t0 = time.time()
    exp = Experiment.open(cfg)
    data, split = exp.data_and_split()  # bad data fails here, before anything is written
    base = base_starts(exp.cfg, exp, data.num_classes)  # and unusable weights
    owns_ray = start_ray(exp.cfg.address, exp.cfg.num_cpus)
    try:
        r = Run(exp.cfg, exp, data, split, base, plan_for_cluster(exp.cfg), t0)
        if r.cfg.budget_s is not None and not exp.resumed:
            plan_time(r)
        exp.create(data, split)  # only once the search is sure to start
        return search(r)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()


def plan_time(r: Run) -> None:
    """Fits the search into --time-budget: measures this machine's training speed, then plans
    epochs, trials, the warm start and the refit."""
    from search import budget
    from search.resources import plan_for_cluster
    from search.start import needs_warm_start
    from trainables.speed import seconds_per_image

    size = int(r.data.images.shape[1])
    models = [dataclasses.replace(r.cfg.train, model=m) for m in r.starts]  # each architecture
    speed = budget.Speed(
        trial=sum(seconds_per_image(t, r.data.num_classes, size, threads=r.plan.threads)
                  for t in models) / len(models),
        solo=sum(seconds_per_image(t, r.data.num_classes, size, threads=r.plan.solo_threads)
                 for t in models) / len(models))
    sizes = r.split.sizes()
    r.budget = budget.plan_budget(
        r.cfg, remaining_s=r.seconds_left(), speed=speed, n_train=sizes["train"],
        n_val=sizes["val"], n_test=sizes["test"], plan=r.plan,
        warm=len(models) if needs_warm_start(r.cfg, r.starts) else 0)
    r.cfg = r.exp.cfg = budget.apply(r.cfg, r.budget)
    r.plan = plan_for_cluster(r.cfg)
    log.info("time budget %s: %s (measured %.1f ms per training image per trial)",
             r.cfg.time_budget, r.budget.describe(), 1000 * speed.trial)


def search(r: Run) -> int:
    """The warm start, the trials on Ray Tune, then the report; returns 0, or 130 when
    interrupted (resumable)."""
    from search.report import finish
    from search.results import ProgressPrinter, ResultsWriter, settle
    from search.resume import continuation, fresh
    from search.start import needs_warm_start, warm_starts, write_starts
    from search.tracking import SearchRun, search_params
    from search.tune import make_trainable, make_tuner, place_inputs

    cfg, store = r.cfg, r.store
    log.info("data: %d images, %d classes, %d px; split train/val/test %s (hash %s)",
             len(r.data.labels), r.data.num_classes, r.data.images.shape[1],
             "/".join(str(v) for v in r.split.sizes().values()), r.split.hash)
    log.info("resources: %s", r.plan.describe())
    r.mlflow = SearchRun.open(cfg.tracking_uri, cfg.experiment, store,
                              search_params(cfg.flat_dict(), r.data.facts(), r.split))
    log.info("MLflow: %s (experiment %r); see it with: mlflow ui --backend-store-uri %s",
             r.mlflow.uri, cfg.experiment, r.mlflow.uri)
    if needs_warm_start(cfg, r.starts):
        r.starts, reports = warm_starts(cfg, r.exp, r.data, r.split, r.starts, r.plan)
        for model, curve in reports.items():
            r.mlflow.log_stage("warm-start", curve, r.starts[model].record())
    write_starts(cfg, r.exp, r.starts)
    cont = continuation(store) if r.exp.resumed else fresh()
    if r.exp.resumed:
        log.info("continuing %s: %d trial(s) ended and are kept, %d interrupted one(s) run again "
                 "(from their last finished epoch), %d trial(s) to go", store.dir, cont.count,
                 len(cont.pending), max(0, cfg.num_samples - cont.count))
    if cfg.num_samples > cont.count or cont.pending:
        trainable = make_trainable(cfg, r.plan, place_inputs(r.data, r.split, r.starts), store)
        recorder = r.mlflow.trial_recorder(trial_params(r), r.data.class_names,
                                           r.data.labels[r.split.val].tolist())
        callbacks = [recorder, ResultsWriter(store, cfg.train.metric, cont.ended),
                     ProgressPrinter(cfg.num_samples, cont.count)]
        make_tuner(cfg, r.plan, trainable, callbacks, cont, store,
                   time_budget_s=_search_deadline(r)).fit()
    out_of_time = time.time() >= r.deadline
    table = settle(store, out_of_time)
    r.mlflow.close_open_trial_runs(table)
    if not out_of_time and unfinished(cfg, table):
        log.warning("search interrupted: %d of %d trials finished; continue it with "
                    "python -m search.run --resume --experiment %s --storage %s",
                    int(table["status"].isin(FINISHED).sum()), cfg.num_samples, cfg.experiment,
                    cfg.storage)
        return 130
    return finish(r, table)


def _search_deadline(r: Run) -> float | None:
    """Seconds Tune may run trials: what the budget plan gives the search, counted from now
    (the warm start has used its share), keeping the refit's time free."""
    from search.budget import FINISH_S, SLACK

    if r.budget is None:
        return None
    left = r.seconds_left() - r.budget.refit_s / SLACK - FINISH_S
    seconds = max(10.0, min(r.budget.search_s, left))
    r.deadline = time.time() + seconds - 1.0
    return seconds


def trial_params(r: Run) -> dict:
    """What every trial's MLflow run records besides its own config: the fixed training
    settings, the image size, the shared start and the resources."""
    from search.tune import trial_train_config

    fixed = {k: v for k, v in dataclasses.asdict(trial_train_config(r.cfg, r.plan)).items()
             if k not in r.cfg.space}
    first = next(iter(r.starts.values()))
    return fixed | {"image_size": r.cfg.resolved_image_size, "init": first.kind,
                    "workers_per_trial": r.plan.workers,
                    "cpus_per_worker": r.plan.cpus_per_worker,
                    "gpus_per_worker": r.plan.gpus_per_worker}


def unfinished(cfg: SearchConfig, table) -> bool:
    """Trials left unfinished, or fewer trials than asked, mean an interruption."""
    ended = table["status"].isin(ENDED)
    return not ended.all() or len(table) < cfg.num_samples


if __name__ == "__main__":
    sys.exit(main())
