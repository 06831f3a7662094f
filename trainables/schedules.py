"""Learning-rate schedules with optional warmup, stepped per optimizer update.

cosine and step come from timm's schedulers (which carry warmup); one-cycle from torch, whose
ramp-up is its warmup; reduce-on-plateau from torch (timm deprecated its own), after a linear
warmup. `LRSchedule` hides the two calling conventions from the loop.
"""

from __future__ import annotations

import warnings

import torch

from trainables.config import SCHEDULERS


class LRSchedule:
    """Drives one optimizer's learning rate.

    Call `after_update()` after every optimizer step and `after_epoch(val_loss)` after each
    validation; each schedule uses the one it needs.
    """

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, *, epochs: float,
                 updates_per_epoch: int, warmup_epochs: int = 0, lr: float | None = None
                 ) -> None:
        from timm.scheduler import create_scheduler_v2

        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}")
        self.name, self.updates, self.epoch, self.optimizer = name, 0, 0, optimizer
        warmup = min(warmup_epochs, max(epochs - 1, 0))
        lr = optimizer.param_groups[0]["lr"] if lr is None else lr  # the peak
        self.shape = {"name": name, "updates_per_epoch": updates_per_epoch,
                      "warmup_epochs": warmup_epochs, "lr": lr}
        # warmup comes first and the schedule fills the epochs after it, so it still peaks at lr
        common = dict(num_epochs=epochs - warmup, warmup_epochs=warmup, warmup_prefix=True,
                      warmup_lr=lr * 0.01, updates_per_epoch=updates_per_epoch)
        # layer decay (timm) gives param groups an lr_scale; torch's schedulers need it spelled out
        scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
        if name == "onecycle":
            total = round(epochs * updates_per_epoch)  # a fitted run's last epoch may be partial
            pct = warmup / epochs if warmup else 0.25
            # torch divides by the length of each phase: both need at least one step
            pct = min(max(pct, 0.01, 1.5 / max(total, 1)), 0.9)
            if total < 2:
                name = self.name = "constant"  # one update cannot rise and fall
            else:
                self.sched = torch.optim.lr_scheduler.OneCycleLR(
                    optimizer, max_lr=[lr * s for s in scales], total_steps=total,
                    pct_start=pct)
        elif name == "plateau":
            # patience scales with the run length: a 10-epoch trial cannot wait 10 epochs
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=0.2, patience=max(1, int(epochs) // 6))
            self.base_lrs = [lr * s for s in scales]
            self.warmup_updates = warmup * updates_per_epoch
            self._set_warmup_lr()
        elif name == "step":
            self.sched, _ = create_scheduler_v2(
                optimizer, "step", decay_epochs=max(1, (epochs - warmup) // 3), decay_rate=0.1,
                step_on_epochs=False, **common)
        elif name == "cosine":
            self.sched, _ = create_scheduler_v2(
                optimizer, "cosine", min_lr=lr * 1e-3, step_on_epochs=False, **common)
        if name == "constant":  # after an optional warmup
            self.sched, _ = create_scheduler_v2(
                optimizer, "step", decay_epochs=epochs + 1, decay_rate=1.0,
                step_on_epochs=False, **common)

    def after_update(self) -> None:
        self.updates += 1
        if self.name == "onecycle":
            if self.updates < self.sched.total_steps:
                self.sched.step()
        elif self.name == "plateau":
            self._set_warmup_lr()
        else:
            self.sched.step_update(num_updates=self.updates)

    def after_epoch(self, val_loss: float) -> None:
        self.epoch += 1
        if self.name == "plateau" and self.updates >= self.warmup_updates:
            self.sched.step(val_loss)

    def _set_warmup_lr(self) -> None:
        if self.updates < self.warmup_updates:
            frac = 0.01 + 0.99 * self.updates / self.warmup_updates
        elif self.updates == self.warmup_updates:
            frac = 1.0
        else:
            return
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * frac

    def resize(self, epochs: float) -> None:
        """Gives the schedule `epochs` in all (a fraction: the last epoch ends early) and keeps
        its place: the updates done stay done and the rest of the curve stretches or shrinks to
        the new end (a run that fits its length to a deadline sets it after its first epochs).
        Reduce-on-plateau has no end to move."""
        if self.shape["name"] == "plateau":
            return
        updates, epoch = self.updates, self.epoch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: "scheduler stepped before the optimizer"
            self.__init__(optimizer=self.optimizer, epochs=epochs, **self.shape)
            for _ in range(updates):
                self.after_update()
        self.epoch = epoch

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the schedule where it stopped."""
        return {"updates": self.updates, "epoch": self.epoch, "sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates, self.epoch = state["updates"], state["epoch"]
        self.sched.load_state_dict(state["sched"])
