"""Refit: the chosen configuration retrained on train + val, the search's final model.

Val has done its job once it has chosen the configuration; a user's own script trains on every
labelled image, and so must the product (scikit-learn's search classes refit by default for the
same reason). The refit starts from the same shared start, runs the chosen trial's epochs and
schedule, keeps its last epoch, and is reported on test next to the val-selected trial.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from search.resources import ResourcePlan
from search.start import Start
from trainables.checkpoint import load_checkpoint
from trainables.config import TrainConfig
from trainables.data import ImageData
from trainables.metrics import classification_metrics
from trainables.split import Split
from trainables.store import ExperimentStore
from trainables.train import TrialInputs, load_trained, predict_proba

log = logging.getLogger("search")
REFIT = "refit/final.pt"


def refit(store: ExperimentStore, data: ImageData, split: Split, starts: dict[str, Start],
          selected_checkpoint: str, plan: ResourcePlan, plugins: list[str]
          ) -> tuple[dict, np.ndarray, list[dict]]:
    """Trains the selected trial's configuration on train + val; returns its record (test
    metrics, checkpoint, seconds), its test probabilities and its per-epoch reports. A refit
    already on disk for the same configuration (a resumed search) is not trained again."""
    import ray

    from search.tune import fit_on_ray

    train_cfg = TrainConfig.from_dict(load_checkpoint(selected_checkpoint)["config"])
    start = starts[train_cfg.model]
    path = store.path(REFIT)
    reports: list[dict] = []
    tick = time.time()
    if not _done(path, train_cfg):
        log.info("refit: the selected configuration on train + val (%d images), %d epoch(s)",
                 len(split.train) + len(split.val), train_cfg.epochs)
        inputs = TrialInputs(data=ray.put(data), init_state=ray.put(start.state),
                             train_idx=np.concatenate([split.train, split.val]),
                             val_idx=np.zeros(0, np.int64), mean=start.mean, std=start.std,
                             init_id=start.id, split_hash=split.hash)
        _, reports = fit_on_ray(train_cfg, inputs, path, plugins, plan)
    model, ckpt = load_trained(str(path), torch.device("cpu"))
    probs = predict_proba(model, data.images, split.test, mean=ckpt["mean"], std=ckpt["std"])
    record = {"checkpoint": store.relative(path), "epochs": train_cfg.epochs,
              "train_images": len(split.train) + len(split.val),
              "seconds": round(time.time() - tick, 1),
              "config": dataclasses.asdict(train_cfg),
              "test": classification_metrics(probs, data.labels[split.test])}
    return record, probs, reports


def _done(path, train_cfg: TrainConfig) -> bool:
    """Whether a finished refit of this configuration is on disk (threads do not matter)."""
    if not path.is_file():
        return False
    saved = TrainConfig.from_dict(load_checkpoint(path)["config"])
    return dataclasses.replace(saved, threads=1) == dataclasses.replace(train_cfg, threads=1)
