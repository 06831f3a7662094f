"""Ray Tune wiring: the shared inputs in the object store, the trial function, Optuna + ASHA,
start and resume."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search.config import SearchConfig
from search.resources import ResourcePlan
from search.resume import STUDY, Continuation, study_storage
from search.space import SpaceSampler, first_points, shortest_epochs, training_values
from trainables.config import TrainConfig
from trainables.inputs import TrialInputs
from trainables.jobs import Resources, fit_with
from trainables.split import Split
from trainables.start import Start
from trainables.store import ExperimentStore, score_column

log = logging.getLogger("search")

PROGRESS = "progress"  # share of its own epochs a trial has done: ASHA's clock


COSTS = {"latency": "latency_ms", "params": "params"}  # measured in every trial (trainables.train)


def metric(cfg: SearchConfig) -> str:
    """What ASHA rungs compare (and Optuna maximises): the trial's running best val score."""
    return score_column(cfg.train.metric)


def objectives(cfg: SearchConfig) -> tuple[str | list[str], str | list[str]]:
    """Optuna's metric(s) and mode(s): the val score, and with --objective accuracy,latency
    (or accuracy,params) the measured cost to minimise next to it."""
    parts = cfg.objective.split(",")
    if len(parts) == 1:
        return metric(cfg), "max"
    return [metric(cfg), COSTS[parts[1]]], ["max", "min"]


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch, also writing each Tune trial id into its Optuna trial (user attribute
    `trial_id`), so the study in optuna.db can be read back against results.csv.

    With a deadline (a budgeted search) it proposes no trial that could not even run the
    shortest schedule the space allows (`min_epochs`, at the pace the trials have shown so far)
    before it: such a trial would be cut off mid-schedule, a partial result that reaches no
    final model, and its time goes to the refit instead (which fits its length to the time
    left)."""

    def __init__(self, *args, deadline: float | None = None, min_epochs: int = 1,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deadline, self.min_epochs = deadline, min_epochs
        self.epoch_s: list[float] = []
        self.out_of_time = False  # it ended the search: no trial fits the time left

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(trial_id, result)
        if result.get("time_this_iter_s"):
            self.epoch_s.append(float(result["time_this_iter_s"]))

    def suggest(self, trial_id: str):
        if self.deadline is not None and self.epoch_s:
            need = self.min_epochs * float(np.median(self.epoch_s))
            left = self.deadline - time.time()
            if left < need:
                log.info("no further trial: the shortest (%d epochs, ~%.0f s at the trials' "
                         "pace) would not end in the %.0f s the search has left; that time goes "
                         "to the refit", self.min_epochs, need, max(0.0, left))
                self.out_of_time = True
                return Searcher.FINISHED
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)  # Ray keeps its Optuna trials here
        if ot_trial is not None:
            ot_trial.set_user_attr("trial_id", trial_id)
        return config


def run_trial(config: dict[str, Any], inputs: dict[str, TrialInputs] | None = None,
              setup: dict[str, Any] | None = None) -> None:
    """The Tune function trainable.

    One worker: the training loop runs right here (no Ray Train start-up cost). Several: the same
    loop runs in a Ray Train `TorchTrainer` (DDP) whose rank-0 reports are forwarded to Tune.
    """
    from ray import tune

    from search.resume import adopt_folder

    trial_id = tune.get_context().get_trial_id()
    store: ExperimentStore = setup["store"]
    adopt_folder(store, trial_id, config)  # an interrupted trial of this config continues here
    train_cfg = dataclasses.replace(setup["train"], **training_values(config))
    inputs = inputs[train_cfg.model]  # each architecture fine-tunes from its own start
    res: Resources = setup["resources"]
    callbacks = []
    if res.workers > 1:  # rank 0's reports reach Tune through Ray Train
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    fit_with(train_cfg, inputs, store.checkpoint(trial_id), res,
             report=with_placement(tune.report), ddp_name=f"ddp-{trial_id}",
             ddp_storage=store.ray_dir, ddp_callbacks=callbacks)


def with_placement(report):
    """Adds where the trial ran (Ray node id, assigned GPU ids) to every report."""
    import ray

    where = {"node_id": ray.get_runtime_context().get_node_id(),
             "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids())}
    return lambda metrics: report({**metrics, **where})


def place_inputs(data_ref, split: Split, starts: dict[str, Start]) -> dict[str, TrialInputs]:
    """Each architecture's trial inputs: the decoded data (already in Ray's object store) and
    its shared start, put there once; every trial and worker then reads them zero-copy."""
    import ray

    return {model: s.inputs(data_ref, split.train, split.val, split_hash=split.hash,
                            state_ref=ray.put(s.state)) for model, s in starts.items()}


def trial_train_config(cfg: SearchConfig, plan: ResourcePlan) -> TrainConfig:
    """The training settings every trial starts from; the search space overrides its entries.
    Trials given a fraction of a GPU know it, so they keep only their share of its memory for
    resident data."""
    share = plan.gpus_per_worker if 0 < plan.gpus_per_worker < 1 else 1.0
    return dataclasses.replace(cfg.train, threads=plan.threads, gpu_share=share)


def make_trainable(cfg: SearchConfig, plan: ResourcePlan, inputs: dict[str, TrialInputs],
                   store: ExperimentStore):
    """`run_trial` bound to the shared inputs (via the object store) and sized for the plan."""
    from ray import tune

    setup = {"train": trial_train_config(cfg, plan), "store": store,
             "resources": Resources(plan.cpus_per_worker, plan.gpus_per_worker, plan.workers)}
    trainable = tune.with_parameters(run_trial, inputs=inputs, setup=setup)
    if plan.workers == 1:
        return tune.with_resources(trainable, {"cpu": plan.cpus_per_worker,
                                               "gpu": plan.gpus_per_worker})
    return tune.with_resources(trainable, {"cpu": plan.trial_cpus})


def make_tuner(cfg: SearchConfig, plan: ResourcePlan, trainable, callbacks: list,
               cont: Continuation, store: ExperimentStore, time_budget_s: float | None = None):
    """The searcher and a Tuner over the trials still to run: Optuna TPE proposes (its study
    lives in the experiment's optuna.db, so a continued search keeps the sampler's history),
    ASHA stops weak trials, Tune runs them. A new search starts with the recommended
    configuration; a continued one with the trials its interruption cut short."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if cfg.search_algorithm == "random":  # Optuna's random sampler over the same space
        sampler = optuna.samplers.RandomSampler(seed=cfg.seed)
    else:
        # few random start-up trials: a time-budgeted search (large --num-samples) may only
        # finish a dozen, and Optuna's default of 10 would leave TPE almost nothing to do
        sampler = optuna.samplers.TPESampler(
            seed=cfg.seed, n_startup_trials=max(2, min(5, cfg.num_samples // 3)),
            multivariate=True, constant_liar=True)
    # When ASHA stops a trial, Optuna is told COMPLETE with the trial's best val accuracy so far.
    # That is deliberate: the partial score is lower than a full run's would be, which is what
    # the sampler should learn (ASHA stopped it for being behind at its rung).
    first = cont.pending if cfg.resume or cfg.extend else \
        first_points(cfg.space) if cfg.start_with_default else []
    metrics, modes = objectives(cfg)
    searcher = StudySearch(space=SpaceSampler(cfg.space), metric=metrics, mode=modes,
                            sampler=sampler, points_to_evaluate=first or None,
                            study_name=STUDY, storage=study_storage(store),
                            deadline=None if time_budget_s is None else
                            time.time() + time_budget_s,
                            min_epochs=shortest_epochs(cfg.space, cfg.train.epochs))
    # the recommended recipe, the yardstick of the rest, runs its whole schedule: its rung
    # scores still count, so weaker trials are stopped against it
    protect = 1 if first and not (cfg.resume or cfg.extend) else 0
    scheduler = protected_asha(protect, **asha_settings(cfg))
    if cfg.early_stopping == "none":
        scheduler = FIFOScheduler()
    return searcher, tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=max(1, cfg.num_samples - cont.count),
                                    max_concurrent_trials=plan.concurrency,
                                    time_budget_s=time_budget_s,
                                    # a warm trial process has torch and timm imported already:
                                    # reusing it saves seconds per trial on small data
                                    reuse_actors=True,
                                    trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        # Ray Tune's own state and trial folders stay in one subfolder of the experiment
        run_config=tune.RunConfig(name=store.ray_dir.name, storage_path=str(store.dir),
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  callbacks=callbacks, verbose=0),
    )


class ProtectedASHA(ASHAScheduler):
    """Ray's ASHA, except that the first `protect` trials it sees are never stopped early.

    A one-cycle schedule is still near its peak learning rate at half its length, where a short
    cosine trial is already annealed: judged at the same share of their schedules, the
    recommended one-cycle recipe lost its rung on a dataset it later won outright when run to
    its end (issue 24). It runs to the end now, and its scores still fill the rungs that the
    other trials are judged against. (A module-level class: Tune pickles its scheduler.)
    """

    def __init__(self, protect: int = 1, **settings) -> None:
        super().__init__(**settings)
        self.protect, self.protected, self.seen = protect, set(), 0

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if self.seen < self.protect:
            self.protected.add(trial.trial_id)
        self.seen += 1

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and trial.trial_id in self.protected \
                and result.get(self._time_attr, 0) < self._max_t:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


def protected_asha(protect: int, **settings) -> ProtectedASHA:
    """ASHA with `settings` that never stops the first `protect` trials early."""
    return ProtectedASHA(protect, **settings)


def asha_settings(cfg: SearchConfig) -> dict[str, Any]:
    """ASHA on the schedule's clock rather than on epochs.

    Trials sample their own number of epochs, and the learning-rate schedule spans them: at epoch 2
    a 10-epoch one-cycle trial is still at its peak learning rate while a 5-epoch cosine trial is
    almost annealed. Comparing them there stops future winners. So the rungs sit at shares of each
    trial's own schedule (`progress` = epoch / epochs): the grace period is expressed in epochs of
    a --max-epochs-long trial and a shorter trial is judged after proportionally fewer epochs.
    """
    # a hair below the exact share, so 3 * (2 / 10) still matches epoch 3 of 5 in floating point
    grace = cfg.resolved_grace_period / cfg.max_epochs - 1e-9
    return {"time_attr": PROGRESS, "metric": metric(cfg), "mode": "max", "max_t": 1.0,
            "grace_period": grace, "reduction_factor": cfg.reduction_factor}

