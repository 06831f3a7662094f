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

from search.config import SearchConfig
from search.experiment import Experiment
from search.resources import ResourcePlan
from search.space import entries, recommended_value
from trainables.checkpoint import load_checkpoint
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


def architectures(cfg: SearchConfig) -> list[str]:
    """The models a search trains: the space's model choices, else the fixed model. The first
    is the primary one (init.pt, warm/); each has a start of its own."""
    models = cfg.space.get("model", cfg.train.model)
    return list(models) if isinstance(models, list) else [models]


def base_starts(cfg: SearchConfig, exp: Experiment, num_classes: int) -> dict[str, Start]:
    """Each architecture's start before any training: a resumed search's saved one, pretrained
    weights, or one seeded random initialisation (also what a warm start begins from). Cheap,
    and it fails early on unusable weights, before anything is written."""
    return {m: _base_start(cfg, exp, num_classes, m, i == 0)
            for i, m in enumerate(architectures(cfg))}


def _base_start(cfg: SearchConfig, exp: Experiment, num_classes: int, model: str,
                primary: bool) -> Start:
    if exp.resumed and exp.store.has_init(model, primary=primary):
        saved = load_checkpoint(exp.store.init_path(model, primary=primary))
        return Start(saved["model"], saved["mean"], saved["std"], saved.get("kind", "random"),
                     saved.get("facts", {}))
    pretrained = resolved_init(cfg) == "pretrained"
    # --pretrained-file holds one architecture's weights: the others start from timm's
    file = cfg.pretrained_file if pretrained and model == cfg.train.model else None
    state = initial_state(model, num_classes, seed=cfg.seed,
                          pretrained=pretrained and (cfg.pretrained or file is None),
                          pretrained_file=file)
    mean, std = normalization(create_model(model, num_classes))
    return Start(state, mean, std, "pretrained" if pretrained else "random")


def needs_warm_start(cfg: SearchConfig, starts: dict[str, Start]) -> bool:
    return resolved_init(cfg) == "warm" and any(s.kind != "warm" for s in starts.values())


def warm_config(cfg: SearchConfig, model: str) -> TrainConfig:
    """The recommended recipe (the search's first trial) of `model`, for --warm-epochs."""
    values = {"model": model}
    for name, (_, spec) in entries(cfg.space, model).items():
        values[name] = recommended_value(name, spec) if isinstance(spec, (dict, list)) else spec
    values.pop("epochs", None)
    return dataclasses.replace(cfg.train, **values, epochs=cfg.resolved_warm_epochs)


def warm_starts(cfg: SearchConfig, exp: Experiment, data: ImageData, split: Split,
                base: dict[str, Start], plan: ResourcePlan
                ) -> tuple[dict[str, Start], dict[str, list[dict]]]:
    """Each architecture's warm start (one after another, each with the whole machine), saved
    as its init file; returns the starts and each one's per-epoch reports (for MLflow)."""
    starts, reports = dict(base), {}
    for i, (model, start) in enumerate(base.items()):
        if start.kind != "warm":
            starts[model], reports[model] = _warm_start(cfg, exp, data, split, start, model,
                                                        plan, primary=i == 0)
    return starts, reports


def _warm_start(cfg: SearchConfig, exp: Experiment, data: ImageData, split: Split, base: Start,
                model: str, plan: ResourcePlan, primary: bool) -> tuple[Start, list[dict]]:
    """Trains one warm start on the train split. Its checkpoint lies in <experiment>/warm/ (with
    a resume state, so an interrupted warm start continues)."""
    import ray

    from search.tune import fit_on_ray

    train_cfg = warm_config(cfg, model)
    log.info("warm start of %s: %s for %d epoch(s) on the train split, every trial of it "
             "fine-tunes from it", model, train_cfg.scheduler, train_cfg.epochs)
    inputs = TrialInputs(data=ray.put(data), init_state=ray.put(base.state),
                         train_idx=split.train, val_idx=split.val, mean=base.mean, std=base.std,
                         init_id=base.id, split_hash=split.hash)
    tick = time.time()
    path = exp.store.path("warm/best.pt" if primary else f"warm/{model}/best.pt")
    best, reports = fit_on_ray(train_cfg, inputs, path, cfg.plugins, plan)
    facts = {"model": model, "epochs": train_cfg.epochs, "val_acc": float(best["val_acc"]),
             "val_f1": float(best["val_f1"]), "seconds": round(time.time() - tick, 1),
             "best_epoch": int(best["epoch"])}
    log.info("warm start of %s: val accuracy %.4f after %d epoch(s), %.0f s", model,
             facts["val_acc"], train_cfg.epochs, facts["seconds"])
    start = Start(load_checkpoint(path)["model"], base.mean, base.std, "warm", facts)
    exp.store.write_init(start.state, start.mean, start.std, model, kind="warm", facts=facts,
                         primary=primary)
    return start, reports


def write_starts(cfg: SearchConfig, exp: Experiment, starts: dict[str, Start]) -> None:
    """Saves each start that is not on disk yet (pretrained or random ones)."""
    for i, (model, s) in enumerate(starts.items()):
        if not exp.store.has_init(model, primary=i == 0):
            exp.store.write_init(s.state, s.mean, s.std, model, kind=s.kind, facts=s.facts,
                                 primary=i == 0)


def starts_record(starts: dict[str, Start]) -> dict:
    """For summary.json and MLflow: the primary start's record, and every architecture's when
    there are several."""
    records = {m: s.record() for m, s in starts.items()}
    first = next(iter(records.values()))
    return first if len(records) == 1 else {**first, "by_model": records}
