"""`python -m search.run`: data -> split -> Optuna/ASHA search on Ray Tune -> MLflow -> results."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

from search.config import SearchConfig, parse_config
from search.experiment import Experiment
from trainables.cli import run_main, start_ray
from trainables.data import ImageData
from trainables.split import Split
from trainables.store import ENDED, FINISHED

log = logging.getLogger("search")


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes end in one sentence and exit code 2, never a traceback."""
    return run_main(lambda: run(parse_config(argv)))


def run(cfg: SearchConfig) -> int:
    """Runs (or resumes) one search and writes its results; returns the exit code."""
    from search.start import shared_init

    start = time.time()
    exp = Experiment.open(cfg)
    cfg = exp.cfg
    data, split = exp.data_and_split()  # bad data fails here, before anything is written
    init = shared_init(cfg, exp, data.num_classes)
    exp.create(data, split, init)
    owns_ray = start_ray(cfg.address, cfg.num_cpus)
    try:
        return search(cfg, exp, data, split, init, start)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()


def search(cfg: SearchConfig, exp: Experiment, data: ImageData, split: Split,
           init: tuple[dict, list[float], list[float]], start: float) -> int:
    """Runs the trials on Ray Tune; returns 0, or 130 when interrupted (resumable)."""
    from search.report import finish
    from search.resources import plan_for_cluster
    from search.results import ProgressPrinter, ResultsWriter, settle
    from search.tracking import SearchRun, search_params
    from search.tune import make_trainable, make_tuner, place_inputs, restore_tuner

    log.info("data: %d images, %d classes, %d px; split train/val/test %s (hash %s)",
             len(data.labels), data.num_classes, data.images.shape[1],
             "/".join(str(v) for v in split.sizes().values()), split.hash)
    plan = plan_for_cluster(cfg)
    log.info("resources: %s", plan.describe())
    store = exp.store
    run = SearchRun.open(cfg.tracking_uri, cfg.experiment, store,
                         search_params(cfg.flat_dict(), data.facts(), split))
    log.info("MLflow: %s (experiment %r); see it with: mlflow ui --backend-store-uri %s",
             run.uri, cfg.experiment, run.uri)
    trainable = make_trainable(cfg, plan, place_inputs(data, split, init), store)
    if exp.resumed:
        log.info("resuming %s: finished trials are kept, unfinished ones run again", store.dir)
        tuner = restore_tuner(store, trainable)
    else:
        recorder = run.trial_recorder(trial_params(cfg, plan), data.class_names,
                                      data.labels[split.val].tolist())
        tuner = make_tuner(cfg, plan, trainable,
                           [recorder, ResultsWriter(store), ProgressPrinter(cfg.num_samples)])
    tuner.fit()
    out_of_time = cfg.time_budget_s is not None and time.time() - start >= cfg.time_budget_s
    table = settle(store, out_of_time)
    run.close_open_trial_runs(table)
    if not out_of_time and unfinished(cfg, table):
        log.warning("search interrupted: %d of %d trials finished; continue it with "
                    "python -m search.run --resume --experiment %s --storage %s",
                    int(table["status"].isin(FINISHED).sum()), cfg.num_samples, cfg.experiment,
                    cfg.storage)
        return 130
    return finish(cfg, store, table, data, split, run, start)


def trial_params(cfg: SearchConfig, plan) -> dict:
    """What every trial's MLflow run records besides its own config: the fixed training
    settings, the image size and the resources."""
    from search.tune import trial_train_config

    fixed = {k: v for k, v in dataclasses.asdict(trial_train_config(cfg, plan)).items()
             if k not in cfg.space}
    return fixed | {"image_size": cfg.resolved_image_size, "workers_per_trial": plan.workers,
                    "cpus_per_worker": plan.cpus_per_worker,
                    "gpus_per_worker": plan.gpus_per_worker}


def unfinished(cfg: SearchConfig, table) -> bool:
    """Trials left unfinished, or fewer trials than asked, mean an interruption."""
    ended = table["status"].isin(ENDED)
    return not ended.all() or len(table) < cfg.num_samples


if __name__ == "__main__":
    sys.exit(main())
