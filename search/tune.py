"""Ray Tune wiring: resources, the trial function, Optuna + ASHA, start and resume."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.config import SearchConfig
from search.space import SpaceSampler, recommended_point
from trainables.errors import UserError
from trainables.models import import_plugins
from trainables.train import TrainConfig, TrialInputs, fit, train_worker

METRIC = "best_val_acc"  # running best: monotone per trial, what ASHA rungs and Optuna compare
PROGRESS = "progress"  # share of its own epochs a trial has done: ASHA's clock
DDP_TRIAL_CPU = 0.1  # what a trial that only drives a TorchTrainer reserves next to its workers


@dataclass(frozen=True)
class ResourcePlan:
    """How trials map onto the cluster."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    trial_cpus: float  # the Tune trial's own reservation
    concurrency: int

    @property
    def threads(self) -> int:
        return max(1, int(round(self.cpus_per_worker)))

    def describe(self) -> str:
        mode = "inline" if self.workers == 1 else f"DDP x{self.workers} via Ray Train"
        gpu = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return (f"{self.concurrency} trial(s) at once, each {mode}: "
                f"{self.cpus_per_worker:g} CPU{gpu} per worker")


def autoscaling_capacity(config: dict | str | Path | None = None
                         ) -> tuple[dict[str, float], list[dict[str, float]]] | None:
    """What an autoscaling cluster can grow to, from its launcher config.

    On a `ray up` cluster the head holds it as ~/ray_bootstrap_config.yaml; searches run there
    (ray job submit), so a GPU search can be planned before any GPU worker has started.
    Returns (total resources, one resource dict per possible node), or None without a config.
    """
    import yaml

    if config is None:
        config = Path.home() / "ray_bootstrap_config.yaml"
    if not isinstance(config, dict):
        if not Path(config).is_file():
            return None
        config = yaml.safe_load(Path(config).read_text())
    nodes = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        count = 1 if name == config.get("head_node_type") else int(node_type.get("max_workers", 0))
        nodes += [dict(node_type.get("resources") or {})] * count
    if not nodes:
        return None
    total: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            total[k] = total.get(k, 0) + float(v)
    return total, nodes


def plan_resources(cfg: SearchConfig, total: dict[str, float], nodes: list[dict[str, float]],
                   capacity: tuple[dict[str, float], list[dict[str, float]]] | None = None
                   ) -> ResourcePlan:
    """Sizes workers and concurrency to the cluster; a trial that can never fit is a UserError.

    With an autoscaler's `capacity`, a trial that does not fit the nodes up now but fits what the
    cluster can grow to is planned against that (the autoscaler adds the nodes as trials wait).
    """
    try:
        return _plan(cfg, total, nodes)
    except UserError:
        if capacity is None:
            raise
        return _plan(cfg, *capacity)


def _plan(cfg: SearchConfig, total: dict[str, float], nodes: list[dict[str, float]]
          ) -> ResourcePlan:
    w, g = cfg.workers_per_trial, cfg.gpus_per_worker
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    trial_cpus = DDP_TRIAL_CPU if w > 1 else 0.0
    c = cfg.cpus_per_worker
    if c is None:  # one CPU per worker, shrunk so one DDP trial fits beside its driver
        c = 1.0 if w == 1 else min(1.0, math.floor((cpus - trial_cpus) / w * 20) / 20)
        c = max(c, 0.05)
    need_cpu, need_gpu = trial_cpus + w * c, w * g
    biggest_cpu = max((n.get("CPU", 0) for n in nodes), default=0)
    biggest_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9 or c > biggest_cpu + 1e-9 \
            or g > biggest_gpu + 1e-9:
        raise UserError(
            f"a trial needs {need_cpu:g} CPU and {need_gpu:g} GPU ({w} worker(s) of {c:g} CPU, "
            f"{g:g} GPU) but the cluster has {cpus:g} CPU and {gpus:g} GPU (largest node "
            f"{biggest_cpu:g} CPU, {biggest_gpu:g} GPU); lower --workers-per-trial, "
            "--cpus-per-worker or --gpus-per-worker, or add nodes")
    fits = math.floor(cpus / need_cpu + 1e-9)
    if need_gpu:
        fits = min(fits, math.floor(gpus / need_gpu + 1e-9))
    concurrency = min(cfg.max_concurrent or fits, cfg.num_samples)
    return ResourcePlan(w, c, g, trial_cpus, max(1, concurrency))


def run_trial(config: dict[str, Any], inputs: TrialInputs | None = None,
              setup: dict[str, Any] | None = None) -> None:
    """The Tune function trainable.

    One worker: the training loop runs right here (no Ray Train start-up cost). Several: the same
    loop runs in a Ray Train `TorchTrainer` (DDP) whose rank-0 reports are forwarded to Tune.
    """
    from ray import tune

    import_plugins(setup["plugins"])
    trial_id = tune.get_context().get_trial_id()
    checkpoint = str(Path(setup["checkpoint_root"]) / trial_id / "best.pt")
    train_cfg = TrainConfig.from_dict({**setup["fixed"], **config})
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
        run_config=RunConfig(name=f"ddp-{trial_id}", storage_path=setup["train_storage"],
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def with_placement(report):
    """Adds where the trial ran (Ray node id, assigned GPU ids) to every report."""
    import ray

    where = {"node_id": ray.get_runtime_context().get_node_id(),
             "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids())}
    return lambda metrics: report({**metrics, **where})


def make_trainable(cfg: SearchConfig, plan: ResourcePlan, inputs: TrialInputs,
                   experiment_dir: Path):
    """`run_trial` bound to the shared inputs (via the object store) and sized for the plan."""
    from ray import tune

    fixed = {k: getattr(cfg, k) for k in ("model", "optimizer", "augment", "hflip", "amp",
                                          "accum_steps", "label_smoothing", "mixup", "cutmix",
                                          "warmup_epochs", "grad_clip", "seed")}
    setup = {
        "fixed": fixed | {"threads": plan.threads},
        "plugins": list(cfg.plugins),
        "workers": plan.workers,
        "cpus_per_worker": plan.cpus_per_worker,
        "gpus_per_worker": plan.gpus_per_worker,
        "checkpoint_root": str(experiment_dir / "checkpoints"),
        "train_storage": str(experiment_dir / "ray_train"),
    }
    trainable = tune.with_parameters(run_trial, inputs=inputs, setup=setup)
    if plan.workers == 1:
        return tune.with_resources(trainable, {"cpu": plan.cpus_per_worker,
                                               "gpu": plan.gpus_per_worker})
    return tune.with_resources(trainable, {"cpu": plan.trial_cpus})


def make_tuner(cfg: SearchConfig, plan: ResourcePlan, trainable, callbacks: list):
    """A fresh Tuner: Optuna TPE proposes, ASHA stops weak trials, Tune runs them."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

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
    first = [recommended_point(cfg.space)] if cfg.start_with_default else []
    searcher = OptunaSearch(space=SpaceSampler(cfg.space), metric=METRIC, mode="max",
                            sampler=sampler, points_to_evaluate=first or None)
    scheduler = ASHAScheduler(**asha_settings(cfg))
    if cfg.early_stopping == "none":
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=cfg.num_samples,
                                    max_concurrent_trials=plan.concurrency,
                                    time_budget_s=cfg.time_budget_s,
                                    # a warm trial process has torch and timm imported already:
                                    # reusing it saves seconds per trial on small data
                                    reuse_actors=True,
                                    trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        run_config=tune.RunConfig(name=cfg.experiment,
                                  storage_path=str(Path(cfg.experiment_dir).parent),
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
    return {"time_attr": PROGRESS, "metric": METRIC, "mode": "max", "max_t": 1.0,
            "grace_period": grace, "reduction_factor": cfg.reduction_factor}


def restore_tuner(experiment_dir: Path, trainable):
    """The interrupted Tuner: finished trials stay finished, unfinished ones run again."""
    from ray import tune

    if not tune.Tuner.can_restore(str(experiment_dir)):
        raise UserError(f"{experiment_dir} holds no resumable search (it never started or its "
                        "state is missing); run without --resume to start it")
    return tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True,
                              resume_errored=False)
