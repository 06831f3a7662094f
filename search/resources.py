"""How trials map onto the cluster: workers, CPUs and GPUs per worker, trials at once.

Trials are Tune's to run; every other training job takes a whole node
(`trainables.jobs.whole_node`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from search.config import SearchConfig
from trainables.errors import UserError

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
    concurrency = max(1, min(cfg.max_concurrent or fits, cfg.num_samples))
    return ResourcePlan(w, c, g, trial_cpus, concurrency)


def plan_for_cluster(cfg: SearchConfig) -> ResourcePlan:
    """The plan for the Ray cluster this process is connected to (and what it can grow to)."""
    import ray

    from trainables.jobs import autoscaling_capacity

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return plan_resources(cfg, ray.cluster_resources(), nodes, autoscaling_capacity())
