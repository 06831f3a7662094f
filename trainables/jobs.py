"""The training service: the one way a model trains on Ray outside a search's trials.

Trials run under Ray Tune (`search.tune`); every other training job the product starts (the warm
start, the refit, seed retrains, fold models, students) goes through `train`, which decides
where and with what each job runs (`whole_node`, the one resource rule), skips jobs that have
finished (`trainables.store.finished`, the one rule for that), continues interrupted ones from
their last epoch, and returns each job's best metrics and per-epoch reports. A new kind of
retraining is a list of `TrainJob`s. `warm_worker` has a Ray worker import the training code
ahead of the first job, which then runs in that process.

`fit_with` is the one place that starts the training loop with given resources: inline in the
calling process for one worker, as DDP over Ray Train workers for several. Trials use it too.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.config import TrainConfig
from trainables.files import read_json, write_json
from trainables.inputs import TrialInputs
from trainables.store import epochs_path, finished

log = logging.getLogger("trainables")
WAIT_FOR_NODE_S = 60.0  # how long a job waits for its node's resources to be released
PROGRESS_EVERY_S = 60.0  # how often a long training job says how far it has got
WARM_WAIT_S = 20.0  # the longest a job waits for a worker's warm-up to end before it starts
_warming: list = []  # the warm-up task started by `warm_worker`, until a job waits for it


@dataclass(frozen=True)
class Resources:
    """What one training job reserves on Ray, and how it trains with it.

    `workers` processes (DDP through Ray Train when above 1), each holding `cpus` CPUs (used as
    that many torch threads) and `gpus` GPUs.
    """

    cpus: float
    gpus: float = 0.0
    workers: int = 1

    @property
    def threads(self) -> int:
        return max(1, int(round(self.cpus)))

    def describe(self) -> str:
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        mode = "" if self.workers == 1 else f"DDP x{self.workers}, "
        return f"{mode}{self.cpus:g} CPU{gpu}" + (" per worker" if self.workers > 1 else "")


def whole_node(nodes: list[dict[str, float]], jobs: int = 1) -> Resources:
    """The resource rule of every training job outside a search's trials.

    A job that runs alone takes a whole node: every CPU of it as threads and every GPU, with
    DDP over its GPUs when it has several (one worker per GPU, the CPUs shared out). The node is
    the cluster's largest: most GPUs, then most CPUs.

    `jobs` queued at once (seed members, fold models) split a CPU-only node between them, as
    many side by side as it has CPUs: on a 2-core machine two resnet10t processes of one thread
    trained 851 img/s together against 772 for one process of two threads (32 px; 293 against
    277 at 64 px), since a small model's step does not scale perfectly over threads. A GPU node
    is not split (one process with the node's CPUs behind it feeds a GPU best): jobs queue for
    it, or spread over the cluster's nodes.
    """
    if not nodes:
        return Resources(cpus=1.0)
    node = max(nodes, key=lambda n: (float(n.get("GPU", 0)), float(n.get("CPU", 0))))
    cpus, gpus = max(1, int(node.get("CPU", 1))), int(node.get("GPU", 0))
    if gpus > 1:
        return Resources(cpus=max(1, cpus // gpus), gpus=1.0, workers=gpus)
    if gpus == 0 and jobs > 1:
        return Resources(cpus=float(max(1, cpus // min(jobs, cpus))))
    return Resources(cpus=float(cpus), gpus=float(gpus))


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of every node the connected Ray cluster has or can grow to (an
    autoscaler's node types, from its launcher config, count as nodes it can add)."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    capacity = autoscaling_capacity()
    return nodes + (capacity[1] if capacity else [])


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


# ---------------------------------------------------------------------- one run with resources


def fit_with(cfg: TrainConfig, inputs: TrialInputs, checkpoint: str | Path | None,
             resources: Resources, *, report: Callable[[dict], None] | None = None,
             ddp_name: str = "", ddp_storage: str | Path | None = None,
             ddp_callbacks: list | None = None) -> dict[str, float]:
    """Runs the training loop with `resources`: inline in this process (one worker, its CPUs
    as threads), or as DDP over `resources.workers` Ray Train workers, whose rank 0 reports.

    Returns the best epoch's metrics (inline), or {} for DDP (its reports carry them).
    """
    from trainables.train import fit

    cfg = dataclasses.replace(cfg, threads=resources.threads)
    if resources.workers == 1:
        return fit(cfg, inputs, None if checkpoint is None else str(checkpoint), report=report)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainables.train import train_worker

    per_worker = {"CPU": resources.cpus} | ({"GPU": resources.gpus} if resources.gpus else {})
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": dataclasses.asdict(cfg), "inputs": inputs,
                           "checkpoint_path": None if checkpoint is None else str(checkpoint)},
        scaling_config=ScalingConfig(num_workers=resources.workers,
                                     use_gpu=bool(resources.gpus),
                                     resources_per_worker=per_worker),
        # a deterministic name lets a retried run find its own Ray Train run again
        run_config=RunConfig(name=ddp_name or "ddp", storage_path=str(ddp_storage),
                             callbacks=list(ddp_callbacks or [])),
    )
    trainer.fit()
    return {}


# ---------------------------------------------------------------------- the launcher


def _import_training() -> int:
    """A warm-up task's body: the imports a training job starts with (torch, the loop, and
    timm with its optimizers, which the loop imports only when it builds a model: 2 s of
    torchvision); returns its process id."""
    import os

    import timm.optim  # noqa: F401

    import trainables.train  # noqa: F401

    return os.getpid()


def warm_worker() -> None:
    """Has one of Ray's idle worker processes import the training code now, while this process
    still writes its reports: the next training job (the recipe, or the warm start) is a task,
    Ray runs it in that same process, and it starts without ~4 s of cold imports (torch,
    timm: 3.8 s on a 2-core machine). The task reserves no CPU; `train` waits for it to end,
    so a job does not start beside it in a cold process. Only where a job comes next: trials
    run in Tune's actors, which Ray starts in processes of their own, and Ray may end idle
    workers while they run, so a refit after trials may find no warm one."""
    import ray

    _warming.append(ray.remote(_import_training).options(num_cpus=0).remote())


def _wait_for_warm_up() -> None:
    """Waits (up to WARM_WAIT_S) for `warm_worker`'s task, whose process then takes the job."""
    if not _warming:
        return
    import ray

    refs = list(_warming)
    forget_warm_up()
    ray.wait(refs, num_returns=len(refs), timeout=WARM_WAIT_S)


def forget_warm_up() -> None:
    """Drops a warm-up no job waited for (a search of trials only): its Ray may be shut down
    before the process's next job, which must not wait on it."""
    _warming.clear()


@dataclass
class TrainJob:
    """One model to train: its recipe, its inputs (data, shared start, training and val
    images) and where its checkpoint goes; its run folder is the checkpoint's folder."""

    config: TrainConfig
    inputs: TrialInputs
    checkpoint: Path
    name: str = ""


@dataclass
class JobResult:
    """What a job left: its best epoch's metrics, its per-epoch reports, how it ran."""

    checkpoint: Path
    best: dict[str, float]
    reports: list[dict] = field(default_factory=list)
    resources: Resources | None = None  # None: it had finished before, nothing ran
    seconds: float = 0.0

    @property
    def trained(self) -> bool:
        return self.resources is not None


def train(jobs: list[TrainJob], *, ray_dir: str | Path | None = None,
          resources: Resources | None = None,
          progress: Callable[[str], None] | None = None) -> list[JobResult]:
    """Trains `jobs` on the connected Ray cluster; returns their results in order.

    A job alone takes a whole node; several share out a CPU node (`whole_node`, unless
    `resources` says otherwise) and run side by side, over a cluster's nodes too. A job whose
    run has finished with the same recipe (`finished`) is not trained again; an interrupted
    one continues after its last finished epoch. `ray_dir` holds Ray Train's state of DDP jobs.
    While jobs train, `progress` (default: the log) hears how many have finished, once every
    PROGRESS_EVERY_S.
    """
    import ray

    todo = [j for j in jobs if not finished(j.checkpoint, j.config)]
    if not todo:
        return [JobResult(j.checkpoint, _best_of(j.checkpoint), reports_of(j.checkpoint))
                for j in jobs]
    res = _wait_for(resources or whole_node(cluster_nodes(), jobs=len(todo)))
    _wait_for_warm_up()
    put = _ObjectPutter()
    task = ray.remote(_run_job).options(num_cpus=res.cpus * res.workers if res.workers == 1
                                        else 0, num_gpus=res.gpus if res.workers == 1 else 0)
    refs = {id(j): task.remote(j.config, put.inputs(j.inputs), str(j.checkpoint), res,
                               str(ray_dir or j.checkpoint.parent / "ray"), j.name)
            for j in todo}
    _heartbeat(list(refs.values()), [j.name or j.checkpoint.parent.name for j in todo],
               progress or log.info)
    out = []
    for j in jobs:
        if id(j) in refs:
            best, reports, seconds = ray.get(refs[id(j)])
            write_json(epochs_path(j.checkpoint), reports)
            out.append(JobResult(j.checkpoint, best, reports, res, seconds))
        else:
            out.append(JobResult(j.checkpoint, _best_of(j.checkpoint), reports_of(j.checkpoint)))
    return out


def _heartbeat(refs: list, names: list[str], progress: Callable[[str], None]) -> None:
    """Waits for `refs`, saying every PROGRESS_EVERY_S how far the jobs have got."""
    import ray

    tick, pending = time.time(), refs
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=PROGRESS_EVERY_S)
        if pending:
            what = names[0] if len(names) == 1 else f"{len(names)} jobs ({', '.join(names[:4])}" \
                + (", ..." if len(names) > 4 else "") + ")"
            progress(f"training {what}: {len(refs) - len(pending)} of {len(refs)} done, "
                     f"{duration(time.time() - tick)} so far")


def duration(seconds: float) -> str:
    """'1h02m', '3m05s', '42s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _run_job(cfg: TrainConfig, inputs: TrialInputs, checkpoint: str, res: Resources,
             ray_dir: str, name: str) -> tuple[dict, list[dict], float]:
    """One job, in its Ray task: the training loop, its reports collected here (inline) or
    from the run folder (DDP: rank 0 writes them)."""
    reports: list[dict] = []
    tick = time.time()
    best = fit_with(cfg, inputs, checkpoint, res, report=reports.append,
                    ddp_name=f"job-{name or Path(checkpoint).parent.name}", ddp_storage=ray_dir)
    if res.workers > 1:
        reports = reports_of(checkpoint)
        best = _best_of(Path(checkpoint))
    return best, reports, time.time() - tick


def _best_of(checkpoint: Path) -> dict[str, float]:
    from trainables.checkpoint import Checkpoint

    return dict(Checkpoint.load(checkpoint).metrics)


def reports_of(checkpoint: str | Path) -> list[dict]:
    """The per-epoch reports a job left beside its checkpoint ([] if none)."""
    path = epochs_path(checkpoint)
    return read_json(path) if path.is_file() else []


def _wait_for(res: Resources) -> Resources:
    """Waits (up to WAIT_FOR_NODE_S) until the cluster has a job's resources free: Ray
    releases a finished search's trial reservations a moment after Tune returns. If a CPU
    reservation is still held then (seen after DDP trials: Ray kept 1.9 of 2 CPUs for a trial
    that had ended, and a refit asking for 2 waited forever), a one-worker CPU job asks for the
    CPUs that are free instead, so it runs rather than hangs."""
    import ray

    need = {"CPU": res.cpus * res.workers, "GPU": res.gpus * res.workers}
    deadline = time.time() + WAIT_FOR_NODE_S
    free: dict = {}
    while time.time() < deadline:
        free = ray.available_resources()
        if all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v):
            return res
        time.sleep(0.5)
    cpus = float(free.get("CPU", 0.0))
    if res.workers == 1 and not res.gpus and 0 < cpus < res.cpus:
        log.warning("the cluster still holds %.2g of the %g CPUs a training job asked for after "
                    "%.0f s; it runs on the %.2g that are free", res.cpus - cpus, res.cpus,
                    WAIT_FOR_NODE_S, cpus)
        return Resources(cpus=round(cpus, 2))
    log.warning("the cluster has not released %s for a training job after %.0f s; starting it "
                "anyway (it waits for Ray to free them)", res.describe(), WAIT_FOR_NODE_S)
    return res


class _ObjectPutter:
    """Puts each distinct array (data, weights, a teacher's probabilities) into Ray's object
    store once, however many jobs share it; object refs pass through."""

    def __init__(self) -> None:
        self.refs: dict[int, Any] = {}

    def __call__(self, obj: Any) -> Any:
        import ray

        if obj is None or isinstance(obj, ray.ObjectRef):
            return obj
        if id(obj) not in self.refs:
            self.refs[id(obj)] = (ray.put(obj), obj)  # keep obj alive: its id stays unique
        return self.refs[id(obj)][0]

    def inputs(self, inputs: TrialInputs) -> TrialInputs:
        teacher = inputs.teacher
        if teacher is not None:
            teacher = dataclasses.replace(teacher, probs=self(teacher.probs))
        return dataclasses.replace(inputs, data=self(inputs.data),
                                   init_state=self(inputs.init_state), teacher=teacher)
