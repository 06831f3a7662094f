"""`python -m search.run`: one search, as a list of stages with typed hand-offs.

    data -> plan -> data report -> starts -> trials -> selection -> refit -> test -> explain
    -> register -> summary
    (--recipe-only, or a budget that fits no search: the recipe on train + val replaces trials,
    selection and refit)

Each stage is a function of what the earlier ones produced (`search.stages` holds the ones that
are more than a call); nothing is shared through a mutable bag.
"""

from __future__ import annotations

import logging
import time

from search import stages
from search.config import SearchConfig, parse_config
from search.experiment import Experiment
from search.start import base_starts, needs_warm_start
from trainables.cli import exit_now, process_start, run_main, start_ray
from trainables.jobs import forget_warm_up, warm_worker

log = logging.getLogger("search")


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes end in one sentence and exit code 2, never a traceback."""
    started = process_start()
    return run_main(lambda: run(parse_config(argv), started))


def run(cfg: SearchConfig, started: float | None = None) -> int:
    """Runs (or resumes) one search and writes its results; returns the exit code (130 when
    interrupted: the search continues with --resume). `started`: when the command started
    (its --time-budget counts from then), else now."""
    clock = stages.Clock(started or time.time(), cfg.budget_s)
    exp, cfg = Experiment.open(cfg)
    data, split = exp.data_and_split(cfg)  # bad data fails here, before anything is written
    if not exp.resumed:
        cfg = stages.suit_data(cfg, data)
    starts = base_starts(cfg, exp.store, data.num_classes, resumed=exp.resumed)  # and weights
    opening = None if exp.resumed else stages.prepare_tracking(cfg)  # while Ray starts
    owns_ray = start_ray(cfg.address, cfg.num_cpus) or exp.started_ray
    if opening is not None:
        opening.join()  # before the machine's speed is timed, which must run alone
    try:
        cfg, plan, budget = stages.plan(cfg, data, split, starts, clock, resumed=exp.resumed)
        if cfg.recipe_only or needs_warm_start(cfg, starts):  # a job (a Ray task) comes next:
            warm_worker()  # its imports while the reports are written, after the speed timing
        exp.create(cfg, data, split)  # only once the search is sure to start
        store = exp.store
        tracking = stages.open_tracking(cfg, store, data, split, plan)
        data_ref = stages.place_data(data)
        starts = stages.make_starts(cfg, store, data_ref, split, starts, tracking, clock)
        if cfg.recipe_only:
            chosen = None
            final = stages.recipe(cfg, store, data_ref, split, starts, tracking, clock,
                                  budget)
        else:
            table = stages.trials(cfg, store, plan, data, split, data_ref, starts, tracking,
                                  stages.search_deadline(clock, budget), clock,
                                  resumed=exp.resumed)
            if table is None:
                return 130
            chosen = stages.select(cfg, store, table, data, tracking)
            final = stages.refit(cfg, store, data_ref, split, starts, chosen, tracking, clock,
                                 budget)
        tested = stages.test(data, split, chosen, final)
        stages.explain(store, data, split, chosen, final, tracking)
        registered = stages.register(cfg, store, data, split, tested, tracking)
        stages.summary(cfg, store, data, split, starts, budget, chosen, final, tested,
                       registered, tracking, clock)
        return 0
    finally:
        forget_warm_up()
        if owns_ray:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    exit_now(main())
