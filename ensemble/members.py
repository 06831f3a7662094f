"""Ensemble members: the best finished trials of a search, plus retrains with new seeds."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from search.config import SearchConfig
from trainables.checkpoint import Checkpoint
from trainables.data import ImageData
from trainables.errors import UserError
from trainables.split import Split
from trainables.store import FINISHED, ExperimentStore, ranked, snapshots

log = logging.getLogger("ensemble")


@dataclass(frozen=True)
class Member:
    """One model of an ensemble: a trial's best checkpoint, or a seed retrain of its config."""

    name: str
    checkpoint: str
    trial_id: str
    seed: int
    val_acc: float
    init_id: str = ""  # the shared start it was fine-tuned from: soups stay within one start
    snapshots: tuple[str, ...] = ()  # its last epochs' checkpoints (--keep-last), oldest first
    epoch: int = 0  # the epoch its checkpoint holds


@dataclass
class SearchState:
    """What a finished search left in its experiment folder."""

    store: ExperimentStore
    config: SearchConfig  # the search's resolved config.yaml
    results: pd.DataFrame
    data: ImageData
    split: Split

    @property
    def dir(self) -> Path:
        return self.store.dir

    @property
    def experiment(self) -> str:
        return self.store.name

    @property
    def seed(self) -> int:
        return self.config.seed


def open_search(storage: str, experiment: str) -> SearchState:
    """Reads an experiment folder written by `search.run`; a UserError lists what exists."""
    store = ExperimentStore.at(storage, experiment)
    config = store.read_config() if store.holds_search() else {}
    if not (config and (store.has_results() or config.get("recipe_only")) and store.has_data()
            and store.path("split.json").is_file()):
        raise UserError(f"no finished search named {experiment!r} in {store.dir.parent} (found: "
                        f"{', '.join(store.siblings('results.csv')) or 'none'}); pass "
                        "--experiment NAME and --storage, or run python -m search.run first")
    split = store.read_split()
    summary = store.read_summary()
    if summary and summary.get("split_hash") not in (None, split.hash):
        raise UserError(f"{store.path('summary.json')} belongs to split {summary['split_hash']} "
                        f"but split.json is split {split.hash}: two searches wrote this folder; "
                        "rerun the search in a folder of its own (--experiment NAME)")
    results = store.read_results() if store.has_results() else pd.DataFrame()  # recipe: none
    return SearchState(store, SearchConfig.from_dict(config), results,
                       store.read_data(), split)


def top_members(state: SearchState, top: int) -> list[Member]:
    """The `top` finished trials by val accuracy (ties: lower val loss), as members."""
    if top < 1:
        raise UserError(f"--top must be at least 1, not {top}")
    table = ranked(state.results, state.store.metric)
    finished = table[table["status"].isin(FINISHED) & (table["checkpoint"] != "")]
    for r in finished.itertuples():
        if not Path(r.checkpoint).is_file():
            log.warning("trial %s finished but its checkpoint %s is missing; building without "
                        "it", r.trial_id, r.checkpoint)
    usable = finished[[Path(c).is_file() for c in finished["checkpoint"]]]
    if usable.empty:
        raise UserError(f"experiment {state.experiment!r} has no finished trial with a "
                        "checkpoint; run or resume the search first")
    if len(usable) < top:
        log.warning("only %d finished trial(s) in %r, fewer than --top %d: building with %d",
                    len(usable), state.experiment, top, len(usable))
    members = [Member(name=f"trial-{r.trial_id}", checkpoint=r.checkpoint, trial_id=r.trial_id,
                      seed=state.seed, val_acc=float(r.best_val_acc))
               for r in usable.itertuples()]
    members = _described(members, state.split.hash, limit=top)
    if not members:
        raise UserError(f"no checkpoint of experiment {state.experiment!r} can be read (see the "
                        "warnings above); rerun the search")
    return members


def _described(members: list[Member], split_hash: str, limit: int | None = None
               ) -> list[Member]:
    """Up to `limit` members, in order, with their start and snapshots filled in from their
    checkpoints (each read once), after checking that they know the same classes and were
    trained on this split. A checkpoint that cannot be read is named and left out."""
    out: list[Member] = []
    first: tuple[Member, list[str]] | None = None
    for m in members:
        if limit is not None and len(out) == limit:
            break
        try:
            ckpt = Checkpoint.load(m.checkpoint)
        except Exception as exc:  # truncated or foreign files: torch raises many kinds
            log.warning("%s: checkpoint %s cannot be read (%s); building without it", m.name,
                        m.checkpoint, type(exc).__name__)
            continue
        if ckpt.split_hash not in ("", split_hash):
            raise UserError(f"{m.name} ({m.checkpoint}) was trained on split "
                            f"{ckpt.split_hash}, not on this experiment's split {split_hash}; "
                            "rebuild from a folder written by one search")
        if first is None:
            first = (m, ckpt.class_names)
        elif ckpt.class_names != first[1]:
            raise UserError(f"members {first[0].name} and {m.name} were trained on different "
                            f"class lists ({len(first[1])} vs {len(ckpt.class_names)} "
                            "classes); an ensemble can only combine models of the same classes")
        out.append(dataclasses.replace(m, init_id=ckpt.init_id, epoch=ckpt.epoch,
                                       snapshots=tuple(str(p) for p in snapshots(m.checkpoint)),
                                       val_acc=ckpt.val_acc if math.isnan(m.val_acc)
                                       else m.val_acc))
    return out


def retrain_seeds(state: SearchState, members: list[Member], seeds: int) -> list[Member]:
    """Retrains each member's config with `seeds` new seeds through the training service.

    Same training function, same split and the same shared start of its architecture (so soups
    stay possible); the seed changes data order, augmentation and dropout. Retrains finished by
    an earlier build are reused, interrupted ones continue.
    """
    from trainables.jobs import TrainJob, train

    jobs, new = [], []
    starts = {}
    for m in members:
        cfg = Checkpoint.load(m.checkpoint).train_config
        if cfg.model not in starts:  # the member's architecture's own start
            starts[cfg.model] = state.store.read_init(cfg.model)
        for s in range(1, seeds + 1):
            seed = cfg.seed + 1000 * s
            path = state.store.seed_checkpoint(m.trial_id, seed)
            inputs = starts[cfg.model].inputs(state.data, state.split.train, state.split.val,
                                              split_hash=state.split.hash)
            jobs.append(TrainJob(dataclasses.replace(cfg, seed=seed), inputs, path,
                                 name=f"{m.trial_id}-seed{seed}"))
            new.append((m, seed, path))
    log.info("retraining %d member config(s) x %d seed(s): %d run(s)", len(members), seeds,
             len(jobs))
    train(jobs, ray_dir=state.store.ray_dir)
    return _described([Member(name=f"trial-{m.trial_id}-seed{seed}", checkpoint=str(path),
                              trial_id=m.trial_id, seed=seed, val_acc=math.nan)
                       for m, seed, path in new], state.split.hash)
