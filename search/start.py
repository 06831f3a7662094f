"""The shared start every trial of a search fine-tunes from.

Weight averaging (model soups) works between models fine-tuned from one *trained* start; a shared
random initialisation is not enough, because trials with different learning rates leave it for
different basins. So trials start from pretrained weights when the user has them, else from a
warm start: the recommended recipe trained for a few epochs on the train split before the search,
which every trial then fine-tunes (Frankle et al. 2020: networks spawned from one checkpoint after a
little training stay linearly connected). `--init random` keeps one seeded random start.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from search.config import SearchConfig
from search.experiment import Experiment
from search.resources import ResourcePlan
from search.space import recommended_point
from trainables.config import TrainConfig
from trainables.data import ImageData
from trainables.models import create_model, initial_state, normalization, state_id
from trainables.split import Split
from trainables.train import TrialInputs

log = logging.getLogger("search")


@dataclass
class Start:
    """The weights every trial loads, the normalisation they expect, and where they came from."""

    state: dict
    mean: list[float]
    std: list[float]
    kind: str  # "pretrained", "warm" or "random"
    facts: dict = field(default_factory=dict)  # e.g. the warm start's epochs, val accuracy, time

    @property
    def id(self) -> str:
        """A short content hash: checkpoints with equal ids started from the same weights."""
        return state_id(self.state)

    def record(self) -> dict:
        return {"kind": self.kind, "id": self.id, **self.facts}


def resolved_init(cfg: SearchConfig) -> str:
    """`--init auto`: pretrained weights when the user gave some, else a warm start."""
    if cfg.init != "auto":
        return cfg.init
    return "pretrained" if cfg.pretrained or cfg.pretrained_file else "warm"


def base_start(cfg: SearchConfig, exp: Experiment, num_classes: int) -> Start:
    """The start before any training: a resumed search's saved one, pretrained weights, or one
    seeded random initialisation (also what a warm start begins from). Cheap, and it fails early
    on unusable weights, before anything is written."""
    if exp.resumed and exp.store.has_init():
        saved = exp.store.read_init()
        return Start(saved["model"], saved["mean"], saved["std"], saved.get("kind", "random"),
                     saved.get("facts", {}))
    pretrained = resolved_init(cfg) == "pretrained"
    state = initial_state(cfg.train.model, num_classes, seed=cfg.seed,
                          pretrained=pretrained and cfg.pretrained,
                          pretrained_file=cfg.pretrained_file if pretrained else None)
    mean, std = normalization(create_model(cfg.train.model, num_classes))
    return Start(state, mean, std, "pretrained" if pretrained else "random")


def needs_warm_start(cfg: SearchConfig, start: Start) -> bool:
    return resolved_init(cfg) == "warm" and start.kind != "warm"


def warm_config(cfg: SearchConfig) -> TrainConfig:
    """The recommended recipe (the search's first trial) for --warm-epochs."""
    point = recommended_point({k: v for k, v in cfg.space.items() if k != "epochs"})
    fixed = {k: v for k, v in cfg.space.items() if not isinstance(v, (dict, list))}
    return dataclasses.replace(cfg.train, **{**fixed, **point}, epochs=cfg.resolved_warm_epochs)


def warm_start(cfg: SearchConfig, exp: Experiment, data: ImageData, split: Split, base: Start,
               plan: ResourcePlan) -> tuple[Start, list[dict]]:
    """Trains the warm start on the train split with the whole machine's trial resources.

    Its checkpoint lies in <experiment>/warm/ (with a resume state, so an interrupted warm start
    continues); returns the start and the per-epoch reports (for MLflow)."""
    import ray

    from search.tune import fit_on_ray

    train_cfg = warm_config(cfg)
    log.info("warm start: %s for %d epoch(s) on the train split, every trial fine-tunes from it",
             train_cfg.scheduler, train_cfg.epochs)
    inputs = TrialInputs(data=ray.put(data), init_state=ray.put(base.state),
                         train_idx=split.train, val_idx=split.val, mean=base.mean, std=base.std,
                         init_id=base.id)
    tick = time.time()
    path = exp.store.path("warm/best.pt")
    best, reports = fit_on_ray(train_cfg, inputs, path, cfg.plugins, plan)
    from trainables.checkpoint import load_checkpoint

    state = load_checkpoint(path)["model"]
    facts = {"epochs": train_cfg.epochs, "val_acc": float(best["val_acc"]),
             "val_f1": float(best["val_f1"]), "seconds": round(time.time() - tick, 1),
             "best_epoch": int(best["epoch"])}
    log.info("warm start: val accuracy %.4f after %d epoch(s), %.0f s", facts["val_acc"],
             train_cfg.epochs, facts["seconds"])
    return Start(state, base.mean, base.std, "warm", facts), reports


def seconds_per_image(reports: list[dict]) -> float | None:
    """Training seconds per image from a run's reports (the median epoch), for planning."""
    rates = [r["train_images_per_s"] for r in reports if r.get("train_images_per_s")]
    return 1.0 / float(np.median(rates)) if rates else None
