"""The per-worker training loop: one function for a Tune trial (inline) and each DDP worker."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from trainables.augment import eval_batches, normalize
from trainables.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trainables.config import TrainConfig
from trainables.data import ImageData
from trainables.inputs import Teacher, TrialInputs
from trainables.metrics import classification_metrics
from trainables.models import create_model, import_plugins, unwrap
from trainables.schedules import LRSchedule
from trainables.store import resume_path, snapshot_path

if TYPE_CHECKING:
    from trainables.batches import TrainBatches


def train_worker(loop_config: dict) -> None:
    """Ray Train entry point: each DDP worker runs `fit` on its shard and reports to Ray Train
    (which forwards rank 0's reports to Tune in a trial); rank 0 also keeps them in the run
    folder, for jobs that are not trials."""
    import ray
    import ray.train

    from trainables.files import write_json
    from trainables.store import epochs_path

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    where = {"node_id": ray.get_runtime_context().get_node_id(),
             "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids())}  # rank 0's reaches Tune
    reports: list[dict] = []

    def report(metrics: dict) -> None:
        reports.append({**metrics, **where})
        ray.train.report(reports[-1])

    checkpoint = loop_config.get("checkpoint_path")
    fit(TrainConfig.from_dict(loop_config["config"]), loop_config["inputs"], checkpoint,
        rank=rank, world_size=ctx.get_world_size(), report=report)
    if rank == 0 and checkpoint:
        write_json(epochs_path(checkpoint), reports)


def fit(cfg: TrainConfig, inputs: TrialInputs, checkpoint_path: str | None = None, *,
        rank: int = 0, world_size: int = 1,
        report: Callable[[dict], None] | None = None) -> dict[str, float]:
    """Trains one model; reports metrics every epoch and keeps the best checkpoint.

    The best epoch (by `cfg.metric` on val, ties broken by val loss) is written to
    `checkpoint_path` by rank 0 together with its val probabilities; with `cfg.keep_last` the last
    epochs are kept beside it as `epoch_<n>.pt`. Without val images (a refit on train + val) the
    last epoch is the checkpoint. Every epoch also leaves a resume state (`resume.pt`) beside the
    checkpoint, so a retried trial continues after its last finished epoch instead of starting
    over. Returns the best epoch's metrics.
    """
    torch.set_num_threads(max(1, cfg.threads))
    import_plugins(cfg.plugins)  # modules that register custom models, before one is built
    data: ImageData = _resolve(inputs.data)
    device = worker_device(world_size)
    torch.manual_seed(cfg.seed * 1000 + rank)  # dropout's draws in the model's construction
    model = create_model(cfg.model, data.num_classes, drop_rate=cfg.dropout)
    model.load_state_dict(_resolve(inputs.init_state))
    model.to(device, memory_format=_memory_format(cfg, device))  # before DDP wraps it
    if world_size > 1:
        from ray.train.torch import prepare_model

        # frozen backbone epochs leave parameters without gradients, which DDP must expect
        model = prepare_model(model, parallel_strategy_kwargs={
            "find_unused_parameters": cfg.freeze_epochs > 0})
    loop = _Loop(cfg, model, inputs, data, device, rank, world_size)
    keeper = _Keeper(cfg, checkpoint_path, rank, data, inputs)
    try:
        _epochs(cfg, loop, keeper, data, inputs, report)
    finally:
        loop.batches.close()  # loader workers end with the run
    keeper.finish()
    return keeper.best


def _epochs(cfg: TrainConfig, loop: _Loop, keeper: _Keeper, data: ImageData,
            inputs: TrialInputs, report: Callable[[dict], None] | None) -> None:
    cost: dict[str, float] = {}
    resumed = keeper.resume(loop)
    epoch, times = resumed + 1, []
    while epoch <= loop.cfg.epochs:
        if cfg.fit_by and not resumed and epoch > 1:
            loop.set_length(_fitted_length(cfg, epoch, times, loop))
            keeper.cfg = loop.cfg
        tick = time.time()
        metrics, val_probs = loop.epoch(epoch)
        cost = cost or inference_cost(loop.evaluated, data.images, inputs, loop.amp)
        metrics |= cost
        keeper.after_epoch(epoch, metrics, val_probs, loop)
        loop.schedule.after_epoch(metrics.get("val_loss", metrics["train_loss"]))
        keeper.save_resume(epoch, loop)  # before reporting: a report is never sent twice
        metrics |= keeper.best_metrics()
        metrics["progress"] = epoch / loop.cfg.epochs  # share of its schedule done (ASHA's clock)
        if report is not None:
            report(metrics)
        epoch = epoch + 1
        times.append(time.time() - tick)


# A run given a deadline (`fit_by`) sets its length after each epoch from the pace of its last
# epochs (the first also times the model's inference cost, so it counts only alone: epochs of a
# K = 1 run on blood-cell scans went from 12.1 s to 10.3 s, and a length set after the first two
# left 17 s unused), to the batch: its last epoch may end early (whole epochs left up to one
# unused, ~11 s of a 3-minute budget on blood-cell scans). The budget plan's speed is a short
# synthetic timing made before the run, which read 15 % slow against the real loop on blood-cell
# scans, and its margins left a fifth of the budget unused. The pace is the mean of three epochs,
# so one slow epoch does not cut the run for good (a K = 1 run on clothing photos cut its length
# after one 18 s epoch among 14-15 s ones, and ended 18 s early). The length follows the pace
# both ways to the end: shorter when epochs slow down (a refit on blood-cell scans went from 263
# to ~220 images/s over 23 epochs), longer when they speed up. Runs whose length could only
# shorten in their second half ended 7-17 s (5-11 %) of a K = 1 budget early on the sign photos
# when their third epoch was slow (136 images/s among 145-162): growing late bends the schedule's
# tail only a little (the updates done stay done; 80 % into a cosine, a 5 % longer run lifts the
# learning rate from 10 % to 13 % of its peak).
FIT_MARGIN = 0.97  # of the time left, for epochs that run slower than the ones timed
# The least of its next epoch a fitted run trains (one batch at least): a run that set its
# length to 12.9 epochs and whose 12th epoch ran slow has time for a share of the 13th, not all
# of it (a whole 13th epoch ended a K = 1 run on the sign photos 5 s after its deadline)
LEAST_SHARE = 1e-3


def fitted_length(epoch: int, cap: int, left_s: float, times: list[float]) -> float:
    """A fitted run's length in epochs (a fraction: its last epoch ends early) when epoch
    `epoch` is next, `left_s` remain before its deadline and its epochs so far took `times`:
    the epochs done and as much more as fits at the mean pace of its last three epochs (the
    first only alone), at most `cap`, and at least a batch of this epoch (`_Loop.set_length`
    rounds a share up to one): a run that reached this epoch has time for less than all of it
    when the epochs before ran slower than they were expected to."""
    recent = (times[1:] or times)[-3:]
    more = left_s * FIT_MARGIN / max(sum(recent) / len(recent), 1e-6)
    return min(float(cap), epoch - 1 + max(more, LEAST_SHARE))


def _fitted_length(cfg: TrainConfig, epoch: int, times: list[float], loop: _Loop) -> float:
    """`fitted_length` for `cfg.fit_by` now; all DDP ranks take the shortest any found."""
    length = fitted_length(epoch, max(cfg.epochs, cfg.fit_cap), cfg.fit_by - time.time(), times)
    if loop.world_size > 1:
        import torch.distributed as dist

        agreed = torch.tensor([length], dtype=torch.float64, device=loop.device)  # NCCL: on GPU
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        length = float(agreed.item())
    return length


class _Keeper:
    """What a run keeps on disk: the best checkpoint, the last epochs, the resume state."""

    def __init__(self, cfg: TrainConfig, checkpoint_path: str | None, rank: int,
                 data: ImageData, inputs: TrialInputs) -> None:
        self.cfg, self.rank, self.data, self.inputs = cfg, rank, data, inputs
        self.path = Path(checkpoint_path) if checkpoint_path else None
        self.has_val = len(inputs.val_idx) > 0
        self.key = "val_acc" if cfg.metric == "accuracy" else "val_f1"
        self.best: dict[str, float] = {}

    @property
    def resume_path(self) -> Path | None:
        return resume_path(self.path) if self.path else None

    def resume(self, loop: _Loop) -> int:
        """Loads a resume state left by an interrupted run of this config; its epoch, or 0."""
        p = self.resume_path
        if p is None or not p.is_file():
            return 0
        state = load_checkpoint(p)
        saved = TrainConfig.from_dict(state["config"])
        if not self.cfg.made(saved):
            return 0  # another configuration's leftovers: start afresh
        loop.set_length(saved.length)  # the length a deadline gave it, if it had one
        self.cfg = loop.cfg
        loop.load_state(state)
        self.best = dict(state["best"])
        return int(state["epoch"])

    def after_epoch(self, epoch: int, metrics: dict, val_probs: np.ndarray, loop: _Loop) -> None:
        if not self.has_val:  # a refit: the last epoch is the model
            if epoch == self.cfg.epochs:
                self.best = {"epoch": epoch}
                self._save(self.path, loop, {"epoch": epoch}, val_probs)
            return
        score = (metrics[self.key], -metrics["val_loss"])
        is_best = not self.best or score > (self.best[self.key], -self.best["val_loss"])
        if is_best:
            self.best = {k: metrics[k] for k in ("val_acc", "val_loss", "val_f1")} | {
                "epoch": epoch}
            self._save(self.path, loop, self.best, val_probs)
        if self.cfg.keep_last and epoch > self.cfg.epochs - self.cfg.keep_last and self.path:
            snapshot = snapshot_path(self.path, epoch)
            if not (is_best and self._link(self.path, snapshot)):
                epoch_metrics = {k: metrics[k] for k in ("val_acc", "val_loss", "val_f1")}
                self._save(snapshot, loop, epoch_metrics | {"epoch": epoch}, val_probs)

    def best_metrics(self) -> dict[str, float]:
        if not self.has_val:
            return {}
        return {f"best_{k}": v for k, v in self.best.items() if k != "epoch"} | {
            "best_epoch": self.best["epoch"]}

    def save_resume(self, epoch: int, loop: _Loop) -> None:
        if self.rank == 0 and self.resume_path is not None and epoch < self.cfg.epochs:
            save_checkpoint({"config": dataclasses.asdict(self.cfg), "epoch": epoch,
                             "best": self.best, **loop.state()}, self.resume_path)

    def finish(self) -> None:
        if self.rank == 0 and self.resume_path is not None:
            self.resume_path.unlink(missing_ok=True)

    def _link(self, best: Path, snapshot: Path) -> bool:
        """Gives the best checkpoint just written a second name, the epoch's snapshot: the same
        file, so keeping the last epochs costs no disk for an epoch that is also the best (a later
        best replaces best.pt by a new file and leaves the snapshot as it is). False where the
        file system has no hard links; the caller then writes a copy."""
        if self.rank != 0:
            return True
        tmp = snapshot.with_name(f".{snapshot.name}.link")
        try:
            tmp.unlink(missing_ok=True)
            os.link(best, tmp)
            os.replace(tmp, snapshot)
        except OSError:
            return False
        return True

    def _save(self, path: Path | None, loop: _Loop, metrics: dict, val_probs: np.ndarray) -> None:
        if self.rank == 0 and path is not None:
            _checkpoint(self.cfg, loop.evaluated, self.data, self.inputs, metrics,
                        val_probs).save(path)


class _Loop:
    """The per-epoch work of `fit`, holding the objects one run builds once."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, inputs: TrialInputs,
                 data: ImageData, device: torch.device, rank: int, world_size: int) -> None:
        from timm.optim import create_optimizer_v2
        from timm.utils import ModelEmaV3

        self.cfg, self.model, self.inputs, self.data = cfg, model, inputs, data
        self.device, self.rank, self.world_size = device, rank, world_size
        self.per_rank = math.ceil(len(inputs.train_idx) / world_size)
        self.n_batches = max(1, self.per_rank // cfg.batch_size)
        # fused kernels: on CUDA one launch for the whole update, and GradScaler then hands it
        # the inf check instead of reading it back to the host every step; on CPU one pass in
        # C++ over every tensor (AdamW's step for resnet10t: ~3 ms against 11-30 ms per tensor
        # in Python, 2 cores), the same update to float rounding
        fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
        self.optimizer = create_optimizer_v2(
            model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
            momentum=cfg.momentum, layer_decay=cfg.layer_decay if cfg.layer_decay < 1 else None,
            **fused)
        self.updates_per_epoch = math.ceil(self.n_batches / cfg.accum_steps)
        self.schedule = LRSchedule(cfg.scheduler, self.optimizer, epochs=self._schedule_epochs(),
                                   updates_per_epoch=self.updates_per_epoch,
                                   warmup_epochs=cfg.warmup_epochs)
        self.amp = amp_dtype(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16
                                           and device.type == "cuda")
        self.ema = ModelEmaV3(unwrap(model), decay=cfg.ema, use_warmup=True) if cfg.ema else None
        self.channels_last = _memory_format(cfg, device) == torch.channels_last
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        self.forward = torch.compile(model) if cfg.torch_compile else model
        self.mean = torch.tensor(inputs.mean, device=device)  # built once, not per batch
        self.std = torch.tensor(inputs.std, device=device)
        self.start_memory_mb = peak_memory_mb()  # before a batch of data is read
        # after the first update: the libraries a step loads (OpenCV, the kernels), the model's
        # gradients and optimizer state, one batch; what the peak adds beyond it is the data's
        self.warm_memory_mb: float | None = None
        self.batches = _batches(self, cfg, data, device)
        train_labels = data.labels[inputs.train_idx]
        self.mixup, self.criterion = _loss(cfg, data.num_classes, train_labels, device,
                                           inputs.teacher, data.labels)
        self.sample_weights = _sample_weights(cfg.sampler, train_labels, data.num_classes)
        head = unwrap(model).get_classifier()
        head_params = {id(p) for p in head.parameters()}
        self.backbone = [p for p in unwrap(model).parameters() if id(p) not in head_params]
        self.backbone_bn = [m for m in unwrap(model).modules() if isinstance(
            m, nn.modules.batchnorm._BatchNorm) and not any(m is h for h in head.modules())]

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are validated and saved: the EMA when there is one."""
        return self.ema.module if self.ema is not None else unwrap(self.model)

    def epoch(self, epoch: int) -> tuple[dict[str, float], np.ndarray]:
        self._seed(epoch)
        frozen = epoch <= self.cfg.freeze_epochs
        for p in self.backbone:
            p.requires_grad_(not frozen)
        start = time.perf_counter()
        train_loss, seen, waited = self._train(epoch, frozen)
        train_s = time.perf_counter() - start
        if self.world_size > 1:
            _sync_buffers(self.model)
        metrics = {"epoch": epoch, "train_loss": train_loss,
                   "lr": self.optimizer.param_groups[-1]["lr"],
                   "train_images": seen * self.world_size,  # what this epoch really trained
                   "train_images_per_s": seen * self.world_size / max(train_s, 1e-9),
                   "data_wait_share": waited / max(train_s, 1e-9),
                   "start_memory_mb": self.start_memory_mb, "warm_memory_mb": self.warm_memory_mb,
                   "peak_memory_mb": peak_memory_mb()}
        if not len(self.inputs.val_idx):
            return metrics, np.zeros((0, self.data.num_classes), np.float32)
        images = self.batches.dev_images if self.batches.resident else self.data.images
        probs = predict_proba(self.evaluated, images, self.inputs.val_idx,
                              mean=self.mean, std=self.std, amp=self.amp)
        val = classification_metrics(probs, self.data.labels[self.inputs.val_idx])
        metrics |= {"val_loss": val["loss"], "val_acc": val["accuracy"], "val_f1": val["f1"]}
        return metrics, probs

    def _seed(self, epoch: int) -> None:
        """Each epoch's randomness (dropout, mixup, augmentation) is a function of the seed, the
        rank and the epoch alone, so a run resumed at an epoch continues as it would have."""
        base = self.epoch_seed(epoch)
        torch.manual_seed(base)
        np.random.seed(base % 2**32)  # timm's Mixup draws from numpy's global RNG

    def epoch_seed(self, epoch: int) -> int:
        """The seed of an epoch's randomness on this rank (augmentation parameters too)."""
        return (self.cfg.seed * 1000 + self.rank) * 10_000 + epoch

    def _order(self, epoch: int) -> np.ndarray:
        """This rank's training images for the epoch: a shuffled shard, or a class-balanced draw
        (with replacement) of the same size."""
        rng = np.random.default_rng([self.cfg.seed, epoch])
        n = len(self.inputs.train_idx)
        if self.sample_weights is None:
            perm = rng.permutation(n)
            perm = np.concatenate([perm, perm[:self.per_rank * self.world_size - n]])
        else:
            perm = rng.choice(n, size=self.per_rank * self.world_size, p=self.sample_weights)
        return self.inputs.train_idx[perm[self.rank::self.world_size]]

    def _train(self, epoch: int, frozen: bool) -> tuple[float, int, float]:
        """One pass over the epoch's batches; returns mean loss, images seen, seconds blocked on
        data. In steady state a step makes no host synchronisation: batches, labels, the loss
        sum and the optimizer's inf check stay on the device."""
        cfg, model = self.cfg, self.model
        model.train()
        for bn in self.backbone_bn if frozen else ():
            bn.eval()  # a frozen backbone keeps its BatchNorm statistics too
        total, seen, waited = torch.zeros((), device=self.device), 0, 0.0
        order = self._order(epoch) if isinstance(self.criterion, DistillLoss) else None
        batches = self.batches_in(epoch)
        for i, (x, y, wait) in enumerate(self.batches.epoch(epoch, batches)):
            waited += wait
            if self.mixup is not None and len(x) % 2 == 0:
                x, y = self.mixup(x, y)
            elif self.mixup is not None:  # timm mixup needs an even batch
                y = nn.functional.one_hot(y, self.data.num_classes).float()
            step_now = (i + 1) % cfg.accum_steps == 0 or i + 1 == batches
            sync = contextlib.nullcontext()
            if self.world_size > 1 and not step_now:
                sync = model.no_sync()  # accumulate locally; all-reduce once per update
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                    enabled=self.amp is not None):
                    loss = self.criterion(self.forward(x), _target(self.criterion, y, order, i,
                                                                   cfg.batch_size))
                self.scaler.scale(loss / cfg.accum_steps).backward()
            if step_now:
                self._update()
                if self.warm_memory_mb is None:
                    self.warm_memory_mb = peak_memory_mb()
            total += loss.detach().float() * len(x)
            seen += len(x)
        return float(total) / max(seen, 1), seen, waited

    def _update(self) -> None:
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.after_update()
        if self.ema is not None:
            self.ema.update(unwrap(self.model), step=self.schedule.updates)

    def batches_in(self, epoch: int) -> int:
        """Batches the epoch trains: all of them, but the last epoch's share in the last."""
        if epoch < self.cfg.epochs or self.cfg.last_share >= 1:
            return self.n_batches
        return max(1, round(self.cfg.last_share * self.n_batches))

    def _schedule_epochs(self) -> float:
        """The schedule's length: whole epochs, and the last one's updates."""
        last = math.ceil(self.batches_in(self.cfg.epochs) / self.cfg.accum_steps)
        return self.cfg.epochs - 1 + last / self.updates_per_epoch

    def set_length(self, length: float) -> None:
        """The run's length from now on, in epochs (a fraction ends the last one early, to the
        batch); the schedule stretches or shrinks to it."""
        epochs = max(1, math.ceil(length - 1e-9))
        share = min(1.0, max(1, round((length - epochs + 1) * self.n_batches)) / self.n_batches)
        if (epochs, share) != (self.cfg.epochs, self.cfg.last_share):
            self.cfg = dataclasses.replace(self.cfg, epochs=epochs, last_share=share)
            self.schedule.resize(self._schedule_epochs())

    def state(self) -> dict:
        """Everything an interrupted run needs to continue (see `_Keeper.save_resume`)."""
        state = {"model": {k: v.detach().cpu() for k, v in unwrap(self.model).state_dict()
                           .items()},
                 "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict()}
        if self.ema is not None:
            state["ema"] = {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}
        return state

    def load_state(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray | torch.Tensor,
                  indices: np.ndarray | None = None, *,
                  mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                  amp: torch.dtype | None = None,
                  batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities (N, C) of `images[indices]` (uint8 NHWC, a numpy array or a tensor
    already on the device), batched, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for x in eval_batches(images, indices, batch_size, device):
        x = normalize(x.to(device, non_blocking=True), mean, std)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        out.append(torch.softmax(logits.float(), 1).cpu())
    n_classes = getattr(model, "num_classes", 0)
    return torch.cat(out).numpy() if out else np.zeros((0, n_classes), np.float32)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an AMP mode: fp16 on CUDA, bf16 on CPUs with AMX, else off."""
    if mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if _cpu_has_native_bf16() else None


def _cpu_has_native_bf16() -> bool:
    # bf16 autocast pays on CPUs with AMX tiles; with AVX512-BF16 alone it was slower than fp32
    # (resnet10t at 64 px, 1 thread, interleaved: 99 vs 107 images/s), and slower still without
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _loss(cfg: TrainConfig, num_classes: int, train_labels: np.ndarray,
          device: torch.device, teacher: Teacher | None = None,
          labels: np.ndarray | None = None):
    """timm's Mixup/CutMix (soft targets) when asked, and torch's cross-entropy, which takes
    both hard and soft targets, with label smoothing and class weights. A student (with a
    `teacher`) learns from the teacher's probabilities instead of mixup's mixed labels."""
    from timm.data import Mixup

    weight = _class_weights(cfg.class_weight, train_labels, num_classes)
    if weight is not None:
        weight = torch.as_tensor(weight, dtype=torch.float32, device=device)
    if teacher is not None:
        hard = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
        return None, DistillLoss(_resolve(teacher.probs), labels, hard,
                                 temperature=teacher.temperature, alpha=teacher.alpha)
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                      label_smoothing=cfg.label_smoothing, num_classes=num_classes)
        return mixup, nn.CrossEntropyLoss(weight=weight)  # smoothing is in Mixup's targets
    return None, nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def distillation_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor,
                      *, temperature: float, alpha: float,
                      hard_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                      ) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): alpha * T^2 * KL(teacher_T || student_T)
    + (1 - alpha) * hard_loss(logits, labels), KL averaged over the batch.

    The teacher is an ensemble, which gives probabilities rather than logits, so its softened
    distribution is softmax(log p / T) (p^(1/T) renormalised). T^2 keeps the soft term's
    gradients on the hard term's scale whatever T is. `hard_loss` defaults to cross-entropy.
    """
    t = float(temperature)
    student = nn.functional.log_softmax(logits.float() / t, dim=1)
    teacher = nn.functional.log_softmax(teacher_probs.float().clamp_min(1e-12).log() / t, dim=1)
    soft = nn.functional.kl_div(student, teacher, reduction="batchmean", log_target=True)
    hard = (hard_loss or nn.functional.cross_entropy)(logits.float(), labels)
    return alpha * t * t * soft + (1.0 - alpha) * hard


class DistillLoss(nn.Module):
    """A student's criterion: `distillation_loss` against the teacher's probabilities of the
    batch's images, found by their indices into the data (targets are (labels, indices,
    check)). The teacher's probabilities move to the device once where they are small."""

    ON_DEVICE_BYTES = 256 * 2**20

    def __init__(self, soft_targets: np.ndarray, labels: np.ndarray, hard_loss: nn.Module, *,
                 temperature: float, alpha: float) -> None:
        super().__init__()
        self.soft_targets = torch.as_tensor(np.asarray(soft_targets, np.float32))
        self.labels = torch.as_tensor(np.asarray(labels, np.int64))
        self.hard_loss, self.temperature, self.alpha = hard_loss, temperature, alpha

    def forward(self, logits: torch.Tensor, target: tuple[torch.Tensor, np.ndarray, bool]
                ) -> torch.Tensor:
        y, idx, check = target
        idx = torch.as_tensor(np.asarray(idx, np.int64))
        # the labels are read back only where asked (an epoch's first batch): reading them on
        # every step would make each step wait for the device
        if check and not torch.equal(self.labels[idx], y.cpu()):
            raise RuntimeError("a training batch's labels do not match its indices: batches no "
                               "longer come in `order`, which distillation relies on")
        if (self.soft_targets.device != logits.device
                and self.soft_targets.nbytes <= self.ON_DEVICE_BYTES):
            self.soft_targets = self.soft_targets.to(logits.device)
        teacher = self.soft_targets[idx.to(self.soft_targets.device, non_blocking=True)]
        return distillation_loss(logits, teacher.to(logits.device, non_blocking=True), y,
                                 temperature=self.temperature, alpha=self.alpha,
                                 hard_loss=self.hard_loss)


def _target(criterion: nn.Module, y: torch.Tensor, order: np.ndarray, batch: int,
            batch_size: int) -> Any:
    """What the criterion compares the logits with: the labels, or for a student the labels,
    the batch's indices into the data (batch b of `train_batches` is order[b*bs:(b+1)*bs]) and
    whether to check that they agree (an epoch's first batch)."""
    if not isinstance(criterion, DistillLoss):
        return y
    return y, order[batch * batch_size:(batch + 1) * batch_size], batch == 0


def _class_weights(mode: str, labels: np.ndarray, num_classes: int) -> np.ndarray | None:
    """Per-class weights against imbalance, scaled so the average image weighs 1: inverse class
    frequency ('balanced', as scikit-learn's) or its square root ('sqrt', gentler)."""
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    weight = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    if mode == "sqrt":
        weight = np.sqrt(weight)
    return weight / (weight[labels].mean() or 1.0)


def _sample_weights(mode: str, labels: np.ndarray, num_classes: int) -> np.ndarray | None:
    """Per-image draw probabilities of the class-balanced sampler (None: plain shuffling)."""
    per_class = _class_weights(mode, labels, num_classes)
    if per_class is None:
        return None
    w = per_class[labels]
    return w / w.sum()


def _checkpoint(cfg: TrainConfig, model: nn.Module, data: ImageData, inputs: TrialInputs,
                best: dict, val_probs: np.ndarray) -> Checkpoint:
    return Checkpoint(
        model={k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        config=dataclasses.asdict(cfg), class_names=list(data.class_names),
        image_size=int(data.images.shape[1]), mean=list(inputs.mean), std=list(inputs.std),
        epoch=int(best["epoch"]), metrics={k: float(v) for k, v in best.items()},
        init_id=inputs.init_id, split_hash=inputs.split_hash,
        val_indices=np.asarray(inputs.val_idx, np.int64),
        val_probs=np.asarray(val_probs, np.float32))


def _sync_buffers(model: nn.Module) -> None:
    """Copies rank 0's BatchNorm statistics to every rank.

    DDP broadcasts buffers before each forward, so the last batch leaves ranks slightly apart;
    evaluation (and the plateau schedule that reads its loss) must agree on every rank.
    """
    import torch.distributed as dist

    for buf in unwrap(model).buffers():
        dist.broadcast(buf, src=0)


def _batches(loop: _Loop, cfg: TrainConfig, data: ImageData, device: torch.device
             ) -> TrainBatches:
    """The run's training batches: augmented on the GPU (images resident there when they fit)
    or with OpenCV on the host, as `cfg.augment_device` and `cfg.device_data` ask."""
    from trainables.batch_augment import batch_transform
    from trainables.batches import TrainBatches, fits_on_device, gpu_sharing
    from trainables.cache import streamed

    cuda = device.type == "cuda"
    if cfg.augment_device == "cuda" and not cuda:
        warnings.warn(f"augment_device 'cuda' asked for, but this worker trains on "
                      f"{device.type}: augmenting with OpenCV on the CPU instead; set "
                      f"augment_device to auto, or give workers a GPU", stacklevel=3)
    on_gpu = cuda and cfg.augment_device in ("auto", "cuda")
    resident = on_gpu and cfg.device_data != "stream" and (
        cfg.device_data == "resident" or not streamed(data.images) and fits_on_device(
            data.images.nbytes, torch.cuda.mem_get_info(device)[0],
            sharing=gpu_sharing(cfg.gpu_share)))
    workers = cfg.loader_workers or (2 if cuda and not resident else 0)
    return TrainBatches(
        data.images, data.labels, batch_size=cfg.batch_size, n_batches=loop.n_batches,
        device=device, order_of=loop._order, seed_of=loop.epoch_seed, mean=loop.mean,
        std=loop.std, channels_last=loop.channels_last,
        augment=batch_transform(cfg.augment, hflip=cfg.hflip, dihedral=cfg.dihedral),
        tensor_augment=on_gpu, resident=resident, workers=workers, prefetch=cfg.prefetch,
        pin_memory=cfg.pin_memory)


def _memory_format(cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """channels_last where asked for on CUDA (tensor-core convolutions want NHWC); elsewhere
    the layout is left as it is."""
    if cfg.channels_last and device.type == "cuda":
        return torch.channels_last
    return torch.preserve_format


def peak_memory_mb() -> float:
    """The most memory this process has held so far (its peak resident set), in MB."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return round(kb / (1024 if sys.platform != "darwin" else 1024 * 1024), 1)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def worker_device(world_size: int) -> torch.device:
    """The device this training process trains on. A DDP worker (world_size > 1) takes the one
    Ray Train assigned to it (cuda:<its GPU's index in CUDA_VISIBLE_DEVICES>, so two workers on
    one node never both train on cuda:0); a DDP worker given no GPU trains on the CPU."""
    if world_size > 1:
        from ray.train.torch import get_device

        return get_device()
    return default_device()


def _resolve(obj: Any) -> Any:
    """`obj`, or what it refers to when it is a Ray object ref (Ray is imported only then, so
    `fit` on plain arrays runs where Ray is not installed)."""
    if type(obj).__module__.startswith("ray"):
        import ray

        return ray.get(obj)
    return obj


def inference_cost(model: nn.Module, images: np.ndarray, inputs: TrialInputs,
                   amp: torch.dtype | None, n: int = 64) -> dict[str, float]:
    """Measured, not estimated: milliseconds per image of predicting a batch of `n` val (else
    train) images on this worker's device and threads (the faster of two passes, after a
    warm-up), and the parameter count. What an accuracy-against-cost search trades off."""
    idx = inputs.val_idx if len(inputs.val_idx) else inputs.train_idx
    idx = np.asarray(idx)[:n]
    if not len(idx):
        return {}
    was_training = model.training
    times = []
    for _ in range(3):
        tick = time.perf_counter()
        predict_proba(model, images, idx, mean=inputs.mean, std=inputs.std, amp=amp)
        times.append(time.perf_counter() - tick)
    model.train(was_training)
    return {"latency_ms": 1000 * min(times[1:]) / len(idx),
            "params": float(sum(p.numel() for p in model.parameters()))}
