"""Checkpoints are plain dicts, written atomically and loaded with `weights_only=True`."""

from __future__ import annotations

from pathlib import Path

import torch

from trainables.files import atomic_write


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Writes `state` atomically: a reader never sees a half-written file, and a crash mid-write
    leaves the old one intact."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict:
    """Loads a checkpoint dict onto the CPU without unpickling arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)
