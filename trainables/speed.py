"""How fast this machine trains a model: measured, for planning a search within a time budget."""

from __future__ import annotations

import time

import torch

from trainables.config import TrainConfig


def seconds_per_image(cfg: TrainConfig, num_classes: int, image_size: int, *, threads: int,
                      batch_size: int = 32, steps: int = 3, repeats: int = 3) -> float:
    """Training seconds per image of `cfg.model` at `image_size` with `threads` CPU threads (or
    on the GPU when there is one): forward, backward and an AdamW step under the run's autocast,
    the fastest of `repeats` timings of `steps` steps after two warm-up steps (one timing after
    one warm-up step varied 1.6x between two runs on one machine, and the plan then left 40 %
    of the budget unused). A few seconds; the caller's thread count is restored."""
    from trainables.models import create_model
    from trainables.train import amp_dtype, default_device

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        device = default_device()
        model = create_model(cfg.model, num_classes).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        amp = amp_dtype(cfg.amp, device)
        x = torch.randn(batch_size, 3, image_size, image_size, device=device)
        y = torch.randint(0, num_classes, (batch_size,), device=device)

        def step() -> None:
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def timed() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            tick = time.perf_counter()
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - tick

        step()
        step()
        return min(timed() for _ in range(repeats)) / (steps * batch_size)
    finally:
        torch.set_num_threads(before)
