"""The shared start: the weights every model of a search is fine-tuned from.

Weight averaging (model soups) works between models fine-tuned from one *trained* start; a shared
random initialisation is not enough, because trials with different learning rates leave it for
different basins. So a search's trials, its refit, and later its seed retrains, fold models and
students all start from one `Start` per architecture: pretrained weights, a warm start (the
recommended recipe trained for a few epochs first; Frankle et al. 2020: networks spawned from one
checkpoint after a little training stay linearly connected), or one seeded random
initialisation. The experiment folder keeps each as its init file (`ExperimentStore.init_path`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from trainables.checkpoint import load_checkpoint, save_checkpoint

KINDS = ("pretrained", "warm", "random")


@dataclass
class Start:
    """The weights a model loads, the normalisation they expect, and where they came from."""

    state: dict
    mean: list[float]
    std: list[float]
    kind: str  # one of KINDS
    facts: dict = field(default_factory=dict)  # e.g. the warm start's epochs, val accuracy, time
    model: str = ""  # the timm architecture the weights belong to

    @cached_property
    def id(self) -> str:
        """A short content hash: checkpoints with equal ids started from the same weights."""
        from trainables.models import state_id

        return state_id(self.state)

    def record(self) -> dict:
        return {"kind": self.kind, "id": self.id, **self.facts}

    def inputs(self, data: Any, train_idx: np.ndarray, val_idx: np.ndarray, *,
               split_hash: str = "", state_ref: Any = None, teacher: Any = None):
        """The `TrialInputs` of a model fine-tuned from this start on `data` (the decoded
        images, or a Ray object ref to them); `state_ref` is the weights' own object ref when
        the caller put them into Ray's object store once for many models."""
        from trainables.inputs import TrialInputs

        return TrialInputs(data=data, init_state=self.state if state_ref is None else state_ref,
                           train_idx=np.asarray(train_idx), val_idx=np.asarray(val_idx),
                           mean=list(self.mean), std=list(self.std), init_id=self.id,
                           split_hash=split_hash, teacher=teacher)

    # ------------------------------------------------------------------ the init file

    def save(self, path: str | Path) -> None:
        save_checkpoint({"model": self.state, "mean": list(self.mean), "std": list(self.std),
                         "model_name": self.model, "kind": self.kind,
                         "facts": dict(self.facts)}, path)

    @classmethod
    def load(cls, path: str | Path) -> Start:
        doc = load_checkpoint(path)
        return cls(doc["model"], list(doc["mean"]), list(doc["std"]), doc.get("kind", "random"),
                   dict(doc.get("facts") or {}), doc.get("model_name", ""))
