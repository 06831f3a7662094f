"""Opening a search's experiment folder: new, replaced (--overwrite), resumed (--resume) or
extended (--extend N).

The folder's paths, reads and writes belong to `trainables.store.ExperimentStore`; this module
decides what a search may do with the folder. Its exclusive lock is held for the whole run.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from typing import IO, Any

from search.config import SearchConfig, validate
from trainables.cache import Decoding
from trainables.cli import start_ray
from trainables.config import OPTIONS
from trainables.data import ImageData, load_data
from trainables.errors import UserError
from trainables.split import Split, draw_split
from trainables.store import ExperimentStore

log = logging.getLogger("search")

# options a continued search may change: where and how much it runs, not what it searches
SAFE_ON_RESUME = ("address", "num_cpus", "max_concurrent", "tracking_uri", "max_failures",
                  "num_samples", "time_budget", "cpus_per_worker", "gpus_per_worker")
INVOCATION = ("resume", "extend", "overwrite", "experiment", "storage", "config")


@dataclass
class Experiment:
    """The experiment folder a search runs in, held under its lock for the whole run."""

    store: ExperimentStore
    resumed: bool
    lock: IO[Any] | None = field(default=None, repr=False)
    started_ray: bool = False  # Ray was started here to decode (the search must shut it down)

    def _start_ray(self, cfg: SearchConfig) -> None:
        self.started_ray = start_ray(cfg.address, cfg.num_cpus) or self.started_ray

    @classmethod
    def open(cls, cfg: SearchConfig) -> tuple[Experiment, SearchConfig]:
        """Starts a new experiment folder or reopens one to continue; never clobbers silently.
        Returns the experiment and the config the search runs with (a continued search's saved
        one, with what this invocation may change).

        A folder whose search never reached its first trial (a failed or killed start) holds
        nothing to keep: a plain rerun replaces it and --resume starts it again.
        """
        store = ExperimentStore(cfg.experiment_dir)
        lock = store.lock()
        if cfg.resume or cfg.extend:
            return cls(store, True, lock), _continued_config(cfg, store)
        if store.started() and not cfg.overwrite:
            raise UserError(f"experiment folder {store.dir} already holds a search; pass --resume "
                            "to continue it, --extend N to add trials, --experiment NAME for a "
                            "new one, or --overwrite to replace it")
        if not store.is_empty() and not store.started() and not cfg.overwrite:
            log.warning("%s holds a start that never reached its first trial: replacing it",
                        store.dir)
            cfg = dataclasses.replace(cfg, overwrite=True)
        return cls(store, False, lock), cfg

    def create(self, cfg: SearchConfig, data: ImageData, split: Split) -> None:
        """Writes the folder of a new experiment, once its inputs are known to be good and the
        search is sure to start (the shared start is written when it is known)."""
        if self.resumed:
            return
        if self.store.dir.exists() and cfg.overwrite:
            shutil.rmtree(self.store.dir)
        self.store.dir.mkdir(parents=True, exist_ok=True)
        self.store.write_config(
            dataclasses.replace(cfg, resume=False, overwrite=False, extend=0).to_dict())
        self.store.write_data(data)
        self.store.write_split(split, data.ids)

    def data_and_split(self, cfg: SearchConfig) -> tuple[ImageData, Split]:
        """Decodes the data once (a resumed search reads its data.npz) and draws the split.
        Data that goes to the decoded cache (--data-path) is decoded over the Ray cluster,
        which is started for it here."""
        if self.resumed and self.store.has_data():
            return self.store.read_data(), self.store.read_split()
        log.info("reading %s at %d px ...", cfg.data or "the built-in digits",
                 cfg.resolved_image_size)
        decoding = Decoding(cfg.data_path, self.store.dir.parent,
                            start_cluster=lambda: self._start_ray(cfg))
        data = load_data(cfg.data, image_size=cfg.resolved_image_size, image_col=cfg.image_col,
                         label_col=cfg.label_col, on_bad_image=cfg.on_bad_image,
                         group_col=cfg.group_col, decoding=decoding)
        split = draw_split(data.labels, val_fraction=cfg.val_fraction,
                           test_fraction=cfg.test_fraction, seed=cfg.seed,
                           predefined=data.splits, class_names=data.class_names,
                           groups=data.groups)
        warn_missing_classes(data, split, cfg.train.metric)
        return data, split


def warn_missing_classes(data: ImageData, split: Split, metric: str) -> None:
    """Says when the val or test part lacks classes: its scores then cannot see them (macro F1
    is capped at the share of classes present)."""
    import numpy as np

    for part in ("val", "test"):
        idx = getattr(split, part)
        if not len(idx):
            continue
        missing = sorted(set(range(data.num_classes)) - set(np.unique(data.labels[idx])))
        if missing:
            names = ", ".join(data.class_names[k] for k in missing[:5])
            cap = (f"; its macro F1 cannot exceed {1 - len(missing) / data.num_classes:.2f}, "
                   "which --metric f1 then selects on" if metric == "f1" and part == "val"
                   else "")
            log.warning("the %s part holds no image of %d class(es) (%s)%s; give it more images "
                        "(--%s-fraction) or more images of those classes", part, len(missing),
                        names + (", ..." if len(missing) > 5 else ""), cap, part)


def _continued_config(cfg: SearchConfig, store: ExperimentStore) -> SearchConfig:
    """The saved config of the search to continue, with the options it may change taken from
    this invocation; other options given now are named in a warning and ignored."""
    flag = "--extend" if cfg.extend else "--resume"
    if not store.holds_search():
        raise UserError(f"no experiment {cfg.experiment!r} to continue in {store.dir.parent} "
                        f"(found: {', '.join(store.siblings()) or 'none'}); pass --experiment "
                        f"NAME or start a new search without {flag}")
    doc = store.read_config()
    saved = SearchConfig.from_dict(doc)
    taken = {k: getattr(cfg, k) for k in SAFE_ON_RESUME if k in cfg.given}
    ignored = [k for k in cfg.given if k not in SAFE_ON_RESUME and k not in INVOCATION
               and _value(cfg, k) != _value(saved, k)]
    if ignored:
        log.warning("%s keeps the saved settings of %r; ignoring %s (start a new experiment to "
                    "change them)", flag, cfg.experiment,
                    ", ".join("--" + k.replace("_", "-") for k in sorted(ignored)))
    doc.update(taken, storage=cfg.storage, experiment=cfg.experiment, resume=cfg.resume,
               extend=cfg.extend, overwrite=False)
    if cfg.extend:  # N more than it has (or was asked for, if it has not finished them)
        ended = len(store.read_results()) if store.has_results() else 0
        doc["num_samples"] = max(saved.num_samples, ended) + cfg.extend
    continued = validate(SearchConfig.from_dict(doc))
    # the experiment's config records what it now runs (more trials, other resources)
    store.write_config(dataclasses.replace(continued, resume=False, extend=0).to_dict())
    return continued


def _value(cfg: SearchConfig, name: str) -> Any:
    return getattr(cfg.train, name) if name in OPTIONS else getattr(cfg, name, None)
