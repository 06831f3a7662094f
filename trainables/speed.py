"""How fast this machine trains a model: measured, for planning a search within a time budget."""

from __future__ import annotations

import time

import torch

from trainables.config import TrainConfig


class SpeedProbe:
    """Times training steps of `cfg.model` at `image_size` with `threads` CPU threads (or on the
    GPU when there is one): forward, backward and an AdamW step under the run's autocast, after
    two warm-up steps. `seconds_per_image` may be asked again to time more: the fastest timing
    so far counts (one timing after one warm-up step varied 1.6x between two runs on one machine,
    and the plan then left 40 % of the budget unused). The caller's thread count is restored."""

    def __init__(self, cfg: TrainConfig, num_classes: int, image_size: int, *, threads: int,
                 batch_size: int = 32) -> None:
        from trainables.models import create_model
        from trainables.train import amp_dtype, default_device

        self.threads, self.batch_size = max(1, threads), batch_size
        self.device = default_device()
        self.model = create_model(cfg.model, num_classes).to(self.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.amp = amp_dtype(cfg.amp, self.device)
        self.x = torch.randn(batch_size, 3, image_size, image_size, device=self.device)
        self.y = torch.randint(0, num_classes, (batch_size,), device=self.device)
        self.timings: list[float] = []  # seconds per image, one per timing
        self.warm = False

    def _step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                            enabled=self.amp is not None):
            loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def _timed(self, steps: int) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        for _ in range(steps):
            self._step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - tick

    def seconds_per_image(self, steps: int = 3, repeats: int = 3) -> float:
        """Times `repeats` more timings of `steps` steps; the fastest so far, per image."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            if not self.warm:
                self._step()
                self._step()
                self.warm = True
            for _ in range(repeats):
                self.timings.append(self._timed(steps) / (steps * self.batch_size))
            return min(self.timings)
        finally:
            torch.set_num_threads(before)

