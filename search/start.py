"""The search's shared starts: one per architecture, made before its trials.

Every trial of a search fine-tunes from one start of its architecture (`trainables.start`):
pretrained weights when the user gives some, else a warm start (the recommended recipe trained
for --warm-epochs on the train split, as a job of the training service: alone, on a whole node),
or one seeded random initialisation with `--init random`.
"""

from __future__ import annotations

import dataclasses
import logging

from search.config import SearchConfig
from search.space import entries, recommended_value
from trainables.checkpoint import Checkpoint
from trainables.config import TrainConfig
from trainables.models import create_model, initial_state, normalization
from trainables.split import Split
from trainables.start import Start
from trainables.store import ExperimentStore

log = logging.getLogger("search")


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


def base_starts(cfg: SearchConfig, store: ExperimentStore, num_classes: int, *,
                resumed: bool) -> dict[str, Start]:
    """Each architecture's start before any training: a resumed search's saved one, pretrained
    weights, or one seeded random initialisation (also what a warm start begins from). Cheap,
    and it fails early on unusable weights, before anything is written."""
    return {m: _base_start(cfg, store, num_classes, m, i == 0, resumed)
            for i, m in enumerate(architectures(cfg))}


def _base_start(cfg: SearchConfig, store: ExperimentStore, num_classes: int, model: str,
                primary: bool, resumed: bool) -> Start:
    if resumed and store.has_init(model, primary=primary):
        return Start.load(store.init_path(model, primary=primary))
    pretrained = resolved_init(cfg) == "pretrained"
    # --pretrained-file holds one architecture's weights: the others start from timm's
    file = cfg.pretrained_file if pretrained and model == cfg.train.model else None
    state = initial_state(model, num_classes, seed=cfg.seed,
                          pretrained=pretrained and (cfg.pretrained or file is None),
                          pretrained_file=file)
    mean, std = normalization(create_model(model, num_classes))
    return Start(state, mean, std, "pretrained" if pretrained else "random", model=model)


def needs_warm_start(cfg: SearchConfig, starts: dict[str, Start]) -> bool:
    return resolved_init(cfg) == "warm" and any(s.kind != "warm" for s in starts.values())


def warm_config(cfg: SearchConfig, model: str) -> TrainConfig:
    """The recommended recipe (the search's first trial) of `model`, for --warm-epochs."""
    values = {"model": model}
    for name, (_, spec) in entries(cfg.space, model).items():
        values[name] = recommended_value(name, spec) if isinstance(spec, (dict, list)) else spec
    values.pop("epochs", None)
    return dataclasses.replace(cfg.train, **values, epochs=cfg.resolved_warm_epochs)


def warm_starts(cfg: SearchConfig, store: ExperimentStore, data, split: Split,
                base: dict[str, Start], progress=None
                ) -> tuple[dict[str, Start], dict[str, list[dict]]]:
    """Each architecture's warm start, trained on the train split (one job each, through the
    training service, so each takes a whole node), saved as its init file; returns the starts
    and each one's per-epoch reports (for MLflow). `data` may be a Ray object ref."""
    from trainables.jobs import TrainJob, train

    starts, reports = dict(base), {}
    todo = [(i, m) for i, (m, s) in enumerate(base.items()) if s.kind != "warm"]
    jobs = []
    for i, model in todo:
        train_cfg = warm_config(cfg, model)
        log.info("warm start of %s: %s for %d epoch(s) on the train split, every trial of it "
                 "fine-tunes from it", model, train_cfg.scheduler, train_cfg.epochs)
        jobs.append(TrainJob(train_cfg, base[model].inputs(data, split.train, split.val,
                                                           split_hash=split.hash),
                             store.warm_checkpoint(model, primary=i == 0), name=f"warm-{model}"))
    for (i, model), job, result in zip(todo, jobs, train(jobs, ray_dir=store.ray_dir,
                                                                progress=progress)):
        facts = {"model": model, "epochs": job.config.epochs,
                 "val_acc": float(result.best["val_acc"]), "val_f1": float(result.best["val_f1"]),
                 "seconds": round(result.seconds, 1), "best_epoch": int(result.best["epoch"]),
                 "threads": result.resources.threads if result.resources else None}
        log.info("warm start of %s: val accuracy %.4f after %d epoch(s), %.0f s", model,
                 facts["val_acc"], job.config.epochs, facts["seconds"])
        start = dataclasses.replace(base[model], state=Checkpoint.load(job.checkpoint).model,
                                    kind="warm", facts=facts)
        store.write_init(start, primary=i == 0)
        starts[model], reports[model] = start, result.reports
    return starts, reports


def write_starts(store: ExperimentStore, starts: dict[str, Start]) -> None:
    """Saves each start that is not on disk yet (pretrained or random ones)."""
    for i, (model, s) in enumerate(starts.items()):
        if not store.has_init(model, primary=i == 0):
            store.write_init(s, primary=i == 0)


def starts_record(starts: dict[str, Start]) -> dict:
    """For summary.json and MLflow: the primary start's record, and every architecture's when
    there are several."""
    records = {m: s.record() for m, s in starts.items()}
    first = next(iter(records.values()))
    return first if len(records) == 1 else {**first, "by_model": records}
