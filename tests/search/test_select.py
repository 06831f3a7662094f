"""Choosing the trial to refit: the recommended recipe stays the choice unless val says
clearly that another trial is better (a lead beyond one standard error of the paired
difference)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from search.config import parse_config
from search.space import recommended_point, resolve_space
from search.stages import _recipe_unless_clearly_beaten
from trainables.checkpoint import Checkpoint
from trainables.data import ImageData
from trainables.defaults import SPACE

N = 200


def _trial(tmp_path, name: str, right: np.ndarray, labels: np.ndarray, config: dict) -> dict:
    probs = np.full((N, 2), 0.1, np.float32)
    guess = np.where(right, labels, 1 - labels)
    probs[np.arange(N), guess] = 0.9
    path = tmp_path / f"{name}.pt"
    Checkpoint(model={}, config={}, class_names=["a", "b"], image_size=32, mean=[0.5] * 3,
               std=[0.5] * 3, val_indices=np.arange(N), val_probs=probs).save(path)
    return {"trial_id": name, "best_val_acc": float(right.mean()), "checkpoint": str(path),
            **config}


def test_the_recipe_stays_unless_clearly_beaten(tmp_path):
    cfg = dataclasses.replace(parse_config([]), space=resolve_space(SPACE, 10))  # photos' space
    recipe = {k: v for k, v in recommended_point(cfg.space).items()}
    other = recipe | {"augment": "none"}
    labels = np.arange(N) % 2
    data = ImageData(images=np.zeros((N, 1, 1, 3), np.uint8), labels=labels,
                     class_names=["a", "b"], ids=[str(i) for i in range(N)])
    base = np.arange(N) >= 40  # the recipe gets 160 of 200 right

    def chosen(leader_right: np.ndarray) -> str:
        rows = [_trial(tmp_path, "other", leader_right, labels, other),
                _trial(tmp_path, "recipe", base, labels, recipe)]
        table = pd.DataFrame(rows)  # ranked: the leader first
        return _recipe_unless_clearly_beaten(cfg, table, data, "recipe")["trial_id"]

    close = base.copy()
    close[:3] = True  # 3 more right ...
    close[40:41] = False  # ... 1 fewer: a lead of 2 images, sqrt(4) = 2: not beyond one SE
    assert chosen(close) == "recipe"
    clear = base.copy()
    clear[:8] = True  # a lead of 8 images, sqrt(8) = 2.8
    assert chosen(clear) == "other"
    assert _recipe_unless_clearly_beaten(  # no recommended first trial: val decides alone
        cfg, pd.DataFrame([_trial(tmp_path, "other", close, labels, other),
                           _trial(tmp_path, "recipe", base, labels, recipe)]), data,
        None)["trial_id"] == "other"
