"""The per-worker training loop: one function for a Tune trial (inline) and each DDP worker."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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

    The best epoch (val accuracy, ties broken by val loss) is written to `checkpoint_path` by rank
    0 together with its val probabilities. Returns the best epoch's metrics.
    """
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed * 1000 + rank)
    np.random.seed(cfg.seed * 1000 + rank)  # timm's Mixup draws from numpy's global RNG
    data: ImageData = _resolve(inputs.data)
    device = _device()
    if world_size > 1:  # each DDP worker owns its own GPU of the node, not cuda:0
        from ray.train.torch import get_device

        device = get_device()
    model = create_model(cfg.model, data.num_classes, drop_rate=cfg.dropout)
    model.load_state_dict(_resolve(inputs.init_state))
    model.to(device)
    if world_size > 1:
        from ray.train.torch import prepare_model

        model = prepare_model(model)
    loop = _Loop(cfg, model, inputs, data, device, rank, world_size)
    best: dict[str, float] = {}
    for epoch in range(1, cfg.epochs + 1):
        metrics, val_probs = loop.epoch(epoch)
        if not best or (metrics["val_acc"], -metrics["val_loss"]) > (best["val_acc"],
                                                                     -best["val_loss"]):
            best = {k: metrics[k] for k in ("val_acc", "val_loss", "val_f1")} | {"epoch": epoch}
            if rank == 0 and checkpoint_path:
                save_checkpoint(_checkpoint(cfg, model, data, inputs, best, val_probs),
                                checkpoint_path)
        metrics |= {f"best_{k}": v for k, v in best.items() if k != "epoch"}
        metrics["best_epoch"] = best["epoch"]
        metrics["progress"] = epoch / cfg.epochs  # share of its schedule done (ASHA's clock)
        if report is not None:
            report(metrics)
        loop.schedule.after_epoch(metrics["val_loss"])
    return best


class _Loop:
    """The per-epoch work of `fit`, holding the objects one run builds once."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, inputs: TrialInputs,
                 data: ImageData, device: torch.device, rank: int, world_size: int) -> None:
        from timm.optim import create_optimizer_v2
        from torch.utils.data.distributed import DistributedSampler

        self.cfg, self.model, self.inputs, self.data = cfg, model, inputs, data
        self.device, self.world_size = device, world_size
        self.sampler = DistributedSampler(range(len(inputs.train_idx)), num_replicas=world_size,
                                          rank=rank, shuffle=True, seed=cfg.seed)
        per_rank = len(self.sampler)
        self.n_batches = max(1, per_rank // cfg.batch_size)
        self.optimizer = create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr,
                                             weight_decay=cfg.weight_decay,
                                             momentum=cfg.momentum)
        self.schedule = LRSchedule(cfg.scheduler, self.optimizer, epochs=cfg.epochs,
                                   updates_per_epoch=math.ceil(self.n_batches / cfg.accum_steps),
                                   warmup_epochs=cfg.warmup_epochs)
        self.amp = amp_dtype(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16
                                           and device.type == "cuda")
        self.transform = train_transform(cfg.augment, data.images.shape[1], hflip=cfg.hflip,
                                         seed=cfg.seed * 1000 + rank)
        self.mean = torch.tensor(inputs.mean, device=device)  # built once, not per batch
        self.std = torch.tensor(inputs.std, device=device)
        self.mixup, self.criterion = _loss(cfg, data.num_classes)

    def epoch(self, epoch: int) -> tuple[dict[str, float], np.ndarray]:
        self.sampler.set_epoch(epoch)
        order = self.inputs.train_idx[np.fromiter(iter(self.sampler), np.int64)]
        start = time.perf_counter()
        train_loss, seen, waited = self._train(order)
        train_s = time.perf_counter() - start
        if self.world_size > 1:
            _sync_buffers(self.model)
        probs = predict_proba(unwrap(self.model), self.data.images, self.inputs.val_idx,
                              mean=self.mean, std=self.std, amp=self.amp)
        val = classification_metrics(probs, self.data.labels[self.inputs.val_idx])
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
                   "val_acc": val["accuracy"], "val_f1": val["f1"],
                   "lr": self.optimizer.param_groups[0]["lr"],
                   "train_images_per_s": seen * self.world_size / max(train_s, 1e-9),
                   "data_wait_share": waited / max(train_s, 1e-9)}
        return metrics, probs

    def _train(self, order: np.ndarray) -> tuple[float, int, float]:
        """One pass over `order`; returns mean loss, images seen, seconds blocked on data."""
        cfg, model = self.cfg, self.model
        model.train()
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


def _loss(cfg: TrainConfig, num_classes: int):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                      label_smoothing=cfg.label_smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


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
