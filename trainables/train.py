"""The per-worker training loop: one function for a Tune trial (inline) and each DDP worker."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainables.augment import eval_batches, normalize, train_batches, train_transform
from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.config import TrainConfig
from trainables.data import ImageData
from trainables.metrics import classification_metrics
from trainables.models import create_model, import_plugins, unwrap
from trainables.schedules import LRSchedule


@dataclass
class TrialInputs:
    """What every trial of a search shares: data, split and initial weights.

    `data` and `init_state` may be Ray object refs (zero-copy from the object store) or the
    objects themselves (tests, benchmarks without Ray).
    """

    data: Any
    init_state: Any
    train_idx: np.ndarray
    val_idx: np.ndarray
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    init_id: str = ""  # names the shared start: weights can be averaged within one start only


def train_worker(loop_config: dict) -> None:
    """Ray Train entry point: each DDP worker runs `fit` on its shard and reports to Ray Train."""
    import ray
    import ray.train

    ctx = ray.train.get_context()
    import_plugins(loop_config.get("plugins", ()))
    where = {"node_id": ray.get_runtime_context().get_node_id(),
             "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids())}  # rank 0's reaches Tune
    fit(TrainConfig.from_dict(loop_config["config"]), loop_config["inputs"],
        loop_config.get("checkpoint_path"), rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(), report=lambda m: ray.train.report({**m, **where}))


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
    data: ImageData = _resolve(inputs.data)
    device = _device()
    if world_size > 1:  # each DDP worker owns its own GPU of the node, not cuda:0
        from ray.train.torch import get_device

        device = get_device()
    torch.manual_seed(cfg.seed * 1000 + rank)  # dropout's draws in the model's construction
    model = create_model(cfg.model, data.num_classes, drop_rate=cfg.dropout)
    model.load_state_dict(_resolve(inputs.init_state))
    model.to(device)
    if world_size > 1:
        from ray.train.torch import prepare_model

        # frozen backbone epochs leave parameters without gradients, which DDP must expect
        model = prepare_model(model, parallel_strategy_kwargs={
            "find_unused_parameters": cfg.freeze_epochs > 0})
    loop = _Loop(cfg, model, inputs, data, device, rank, world_size)
    keeper = _Keeper(cfg, checkpoint_path, rank, data, inputs)
    for epoch in range(keeper.resume(loop) + 1, cfg.epochs + 1):
        metrics, val_probs = loop.epoch(epoch)
        keeper.after_epoch(epoch, metrics, val_probs, loop)
        loop.schedule.after_epoch(metrics.get("val_loss", metrics["train_loss"]))
        keeper.save_resume(epoch, loop)  # before reporting: a report is never sent twice
        metrics |= keeper.best_metrics()
        metrics["progress"] = epoch / cfg.epochs  # share of its schedule done (ASHA's clock)
        if report is not None:
            report(metrics)
    keeper.finish()
    return keeper.best


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
        return self.path.with_name("resume.pt") if self.path else None

    def resume(self, loop: _Loop) -> int:
        """Loads a resume state left by an interrupted run of this config; its epoch, or 0."""
        p = self.resume_path
        if p is None or not p.is_file():
            return 0
        state = load_checkpoint(p)
        if state.get("config") != dataclasses.asdict(self.cfg):
            return 0  # another configuration's leftovers: start afresh
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
        if not self.best or score > (self.best[self.key], -self.best["val_loss"]):
            self.best = {k: metrics[k] for k in ("val_acc", "val_loss", "val_f1")} | {
                "epoch": epoch}
            self._save(self.path, loop, self.best, val_probs)
        if self.cfg.keep_last and epoch > self.cfg.epochs - self.cfg.keep_last and self.path:
            epoch_metrics = {k: metrics[k] for k in ("val_acc", "val_loss", "val_f1")}
            self._save(self.path.with_name(f"epoch_{epoch}.pt"), loop,
                       epoch_metrics | {"epoch": epoch}, val_probs)

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

    def _save(self, path: Path | None, loop: _Loop, metrics: dict, val_probs: np.ndarray) -> None:
        if self.rank == 0 and path is not None:
            save_checkpoint(_checkpoint(self.cfg, loop.evaluated, self.data, self.inputs,
                                        metrics, val_probs), path)


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
        self.optimizer = create_optimizer_v2(
            model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
            momentum=cfg.momentum, layer_decay=cfg.layer_decay if cfg.layer_decay < 1 else None)
        self.schedule = LRSchedule(cfg.scheduler, self.optimizer, epochs=cfg.epochs,
                                   updates_per_epoch=math.ceil(self.n_batches / cfg.accum_steps),
                                   warmup_epochs=cfg.warmup_epochs)
        self.amp = amp_dtype(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16
                                           and device.type == "cuda")
        self.ema = ModelEmaV3(unwrap(model), decay=cfg.ema, use_warmup=True) if cfg.ema else None
        self.transform = train_transform(cfg.augment, data.images.shape[1], hflip=cfg.hflip,
                                         seed=cfg.seed * 1000 + rank)
        self.mean = torch.tensor(inputs.mean, device=device)  # built once, not per batch
        self.std = torch.tensor(inputs.std, device=device)
        train_labels = data.labels[inputs.train_idx]
        self.mixup, self.criterion = _loss(cfg, data.num_classes, train_labels, device)
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
        order = self._order(epoch)
        start = time.perf_counter()
        train_loss, seen, waited = self._train(order, frozen)
        train_s = time.perf_counter() - start
        if self.world_size > 1:
            _sync_buffers(self.model)
        metrics = {"epoch": epoch, "train_loss": train_loss,
                   "lr": self.optimizer.param_groups[-1]["lr"],
                   "train_images_per_s": seen * self.world_size / max(train_s, 1e-9),
                   "data_wait_share": waited / max(train_s, 1e-9)}
        if not len(self.inputs.val_idx):
            return metrics, np.zeros((0, self.data.num_classes), np.float32)
        probs = predict_proba(self.evaluated, self.data.images, self.inputs.val_idx,
                              mean=self.mean, std=self.std, amp=self.amp)
        val = classification_metrics(probs, self.data.labels[self.inputs.val_idx])
        metrics |= {"val_loss": val["loss"], "val_acc": val["accuracy"], "val_f1": val["f1"]}
        return metrics, probs

    def _seed(self, epoch: int) -> None:
        """Each epoch's randomness (dropout, mixup, augmentation) is a function of the seed, the
        rank and the epoch alone, so a run resumed at an epoch continues as it would have."""
        base = (self.cfg.seed * 1000 + self.rank) * 10_000 + epoch
        torch.manual_seed(base)
        np.random.seed(base % 2**32)  # timm's Mixup draws from numpy's global RNG
        if self.transform is not None:
            self.transform.set_random_seed(base)

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

    def _train(self, order: np.ndarray, frozen: bool) -> tuple[float, int, float]:
        """One pass over `order`; returns mean loss, images seen, seconds blocked on data."""
        cfg, model = self.cfg, self.model
        model.train()
        for bn in self.backbone_bn if frozen else ():
            bn.eval()  # a frozen backbone keeps its BatchNorm statistics too
        total, seen, waited = torch.zeros((), device=self.device), 0, 0.0
        batches = iter(train_batches(self.data.images, self.data.labels, order,
                                     batch_size=cfg.batch_size, transform=self.transform))
        for i in range(self.n_batches):
            tick = time.perf_counter()
            x, y = next(batches)
            waited += time.perf_counter() - tick
            x = normalize(x.to(self.device, non_blocking=True), self.mean, self.std)
            y = y.to(self.device, non_blocking=True)
            if self.mixup is not None and len(x) % 2 == 0:
                x, y = self.mixup(x, y)
            elif self.mixup is not None:  # timm mixup needs an even batch
                y = nn.functional.one_hot(y, self.data.num_classes).float()
            step_now = (i + 1) % cfg.accum_steps == 0 or i + 1 == self.n_batches
            sync = contextlib.nullcontext()
            if self.world_size > 1 and not step_now:
                sync = model.no_sync()  # accumulate locally; all-reduce once per update
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                    enabled=self.amp is not None):
                    loss = self.criterion(model(x), y)
                self.scaler.scale(loss / cfg.accum_steps).backward()
            if step_now:
                self._update()
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
def predict_proba(model: nn.Module, images: np.ndarray, indices: np.ndarray | None = None, *,
                  mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                  amp: torch.dtype | None = None,
                  batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities (N, C) of `images[indices]`, batched, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for x in eval_batches(images, indices, batch_size):
        x = normalize(x.to(device, non_blocking=True), mean, std)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        out.append(torch.softmax(logits.float(), 1).cpu())
    n_classes = getattr(model, "num_classes", 0)
    return torch.cat(out).numpy() if out else np.zeros((0, n_classes), np.float32)


def load_trained(path_or_state: str | dict, device: torch.device | None = None
                 ) -> tuple[nn.Module, dict]:
    """Rebuilds a trained model from a checkpoint written by `fit`; returns (model, checkpoint)."""
    ckpt = load_checkpoint(path_or_state) if isinstance(path_or_state, str) else path_or_state
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = create_model(cfg.model, len(ckpt["class_names"]), drop_rate=cfg.dropout)
    model.load_state_dict(ckpt["model"])
    return model.to(device or _device()).eval(), ckpt


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an AMP mode: fp16 on CUDA, bf16 on CPUs with native bf16, else off."""
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
    # bf16 autocast is slower than fp32 on CPUs without AVX512-BF16 or AMX
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _loss(cfg: TrainConfig, num_classes: int, train_labels: np.ndarray,
          device: torch.device):
    """timm's Mixup/CutMix (soft targets) when asked, and torch's cross-entropy, which takes
    both hard and soft targets, with label smoothing and class weights."""
    from timm.data import Mixup

    weight = _class_weights(cfg.class_weight, train_labels, num_classes)
    if weight is not None:
        weight = torch.as_tensor(weight, dtype=torch.float32, device=device)
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                      label_smoothing=cfg.label_smoothing, num_classes=num_classes)
        return mixup, nn.CrossEntropyLoss(weight=weight)  # smoothing is in Mixup's targets
    return None, nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


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
                best: dict, val_probs: np.ndarray) -> dict:
    return {
        "format": 1,
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "config": dataclasses.asdict(cfg),
        "class_names": list(data.class_names),
        "image_size": int(data.images.shape[1]),
        "mean": list(inputs.mean),
        "std": list(inputs.std),
        "epoch": int(best["epoch"]),
        "metrics": {k: float(v) for k, v in best.items()},
        "init_id": inputs.init_id,
        "val_indices": torch.tensor(np.asarray(inputs.val_idx, np.int64)),
        "val_probs": torch.from_numpy(np.asarray(val_probs, np.float32)),
    }


def _sync_buffers(model: nn.Module) -> None:
    """Copies rank 0's BatchNorm statistics to every rank.

    DDP broadcasts buffers before each forward, so the last batch leaves ranks slightly apart;
    evaluation (and the plateau schedule that reads its loss) must agree on every rank.
    """
    import torch.distributed as dist

    for buf in unwrap(model).buffers():
        dist.broadcast(buf, src=0)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve(obj: Any) -> Any:
    import ray

    return ray.get(obj) if isinstance(obj, ray.ObjectRef) else obj
