"""Ray Tune wiring: the shared inputs in the object store, the trial function, Optuna + ASHA,
start and resume."""

from __future__ import annotations

import dataclasses
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from search.config import SearchConfig
from search.resources import ResourcePlan
from search.resume import STUDY, Continuation, study_storage
from search.space import SpaceSampler, recommended_point, training_values
from trainables.data import ImageData
from trainables.models import import_plugins
from trainables.split import Split
from trainables.store import ExperimentStore, score_column
from trainables.train import TrainConfig, TrialInputs, fit, train_worker

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
    `trial_id`), so the study in optuna.db can be read back against results.csv."""

    def suggest(self, trial_id: str):
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

    import_plugins(setup["plugins"])
    trial_id = tune.get_context().get_trial_id()
    store: ExperimentStore = setup["store"]
    adopt_folder(store, trial_id, config)  # an interrupted trial of this config continues here
    checkpoint = str(store.checkpoint(trial_id))
    train_cfg = dataclasses.replace(setup["train"], **training_values(config))
    inputs = inputs[train_cfg.model]  # each architecture fine-tunes from its own start
    if setup["workers"] == 1:
        fit(train_cfg, inputs, checkpoint, report=with_placement(tune.report))
        return
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    per_worker = {"CPU": setup["cpus_per_worker"]}
    if setup["gpus_per_worker"]:
        per_worker["GPU"] = setup["gpus_per_worker"]
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": dataclasses.asdict(train_cfg), "inputs": inputs,
                           "checkpoint_path": checkpoint, "plugins": setup["plugins"]},
        scaling_config=ScalingConfig(num_workers=setup["workers"],
                                     use_gpu=bool(setup["gpus_per_worker"]),
                                     resources_per_worker=per_worker),
        # a deterministic name lets a retried trial find its own Ray Train run again
        run_config=RunConfig(name=f"ddp-{trial_id}", storage_path=str(store.path("ray_train")),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def with_placement(report):
    """Adds where the trial ran (Ray node id, assigned GPU ids) to every report."""
    import ray

    where = {"node_id": ray.get_runtime_context().get_node_id(),
             "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids())}
    return lambda metrics: report({**metrics, **where})


def fit_on_ray(train_cfg: TrainConfig, inputs: TrialInputs, checkpoint, plugins: list[str],
               plan: ResourcePlan) -> tuple[dict, list[dict]]:
    """Runs `fit` alone as one Ray task with what all concurrent trials would use on one node
    (the warm start and the refit run when no trial does); returns its best metrics and its
    per-epoch reports."""
    import ray

    task = ray.remote(_fit_task).options(num_cpus=plan.solo_cpus,
                                         num_gpus=1 if plan.gpus_per_worker else 0)
    cfg = dataclasses.replace(train_cfg, threads=plan.solo_threads)
    return ray.get(task.remote(cfg, inputs, str(checkpoint), list(plugins)))


def _fit_task(cfg: TrainConfig, inputs: TrialInputs, checkpoint: str, plugins: list[str]
              ) -> tuple[dict, list[dict]]:
    import_plugins(plugins)
    reports: list[dict] = []
    best = fit(cfg, inputs, checkpoint, report=reports.append)
    return best, reports


def place_inputs(data: ImageData, split: Split, starts: dict) -> dict[str, TrialInputs]:
    """Puts the decoded data and each architecture's shared start (`search.start.Start`) into
    Ray's object store once; every trial and worker then reads them zero-copy. Returns the
    inputs of a trial by its model."""
    import ray

    ref = ray.put(data)
    return {model: TrialInputs(data=ref, init_state=ray.put(s.state), train_idx=split.train,
                               val_idx=split.val, mean=s.mean, std=s.std, init_id=s.id,
                               split_hash=split.hash) for model, s in starts.items()}


def trial_train_config(cfg: SearchConfig, plan: ResourcePlan) -> TrainConfig:
    """The training settings every trial starts from; the search space overrides its entries."""
    return dataclasses.replace(cfg.train, threads=plan.threads)


def make_trainable(cfg: SearchConfig, plan: ResourcePlan, inputs: dict[str, TrialInputs],
                   store: ExperimentStore):
    """`run_trial` bound to the shared inputs (via the object store) and sized for the plan."""
    from ray import tune

    setup = {
        "train": trial_train_config(cfg, plan),
        "plugins": list(cfg.plugins),
        "workers": plan.workers,
        "cpus_per_worker": plan.cpus_per_worker,
        "gpus_per_worker": plan.gpus_per_worker,
        "store": store,
    }
    trainable = tune.with_parameters(run_trial, inputs=inputs, setup=setup)
    if plan.workers == 1:
        return tune.with_resources(trainable, {"cpu": plan.cpus_per_worker,
                                               "gpu": plan.gpus_per_worker})
    return tune.with_resources(trainable, {"cpu": plan.trial_cpus})


def make_tuner(cfg: SearchConfig, plan: ResourcePlan, trainable, callbacks: list,
               cont: Continuation, store: ExperimentStore, time_budget_s: float | None = None):
    """A Tuner over the trials still to run: Optuna TPE proposes (its study lives in the
    experiment's optuna.db, so a continued search keeps the sampler's history), ASHA stops weak
    trials, Tune runs them. A new search starts with the recommended configuration; a continued
    one with the trials its interruption cut short."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

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
        [recommended_point(cfg.space)] if cfg.start_with_default else []
    metrics, modes = objectives(cfg)
    searcher = StudySearch(space=SpaceSampler(cfg.space), metric=metrics, mode=modes,
                            sampler=sampler, points_to_evaluate=first or None,
                            study_name=STUDY, storage=study_storage(store))
    scheduler = ASHAScheduler(**asha_settings(cfg))
    if cfg.early_stopping == "none":
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=max(1, cfg.num_samples - cont.count),
                                    max_concurrent_trials=plan.concurrency,
                                    time_budget_s=time_budget_s,
                                    # a warm trial process has torch and timm imported already:
                                    # reusing it saves seconds per trial on small data
                                    reuse_actors=True,
                                    trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        run_config=tune.RunConfig(name=cfg.experiment,
                                  storage_path=str(cfg.experiment_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  callbacks=callbacks, verbose=0),
    )


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

