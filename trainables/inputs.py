"""What a training run is given besides its settings: the data, the split's indices, the
shared start, and for a student its teacher. Plain containers, so every layer can build them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
    split_hash: str = ""  # names the split: members of one ensemble must share it
    teacher: Teacher | None = None  # distillation: a student learns from it and the labels


@dataclass
class Teacher:
    """What a student (ensemble.distill) learns from besides the labels: the teacher's class
    probabilities of every image of the data, (N, C) (or a Ray ref to them), softened by
    `temperature` and weighted by `alpha` in `distillation_loss`."""

    probs: Any
    temperature: float = 4.0
    alpha: float = 0.9
