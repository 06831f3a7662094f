"""Refit: the chosen configuration retrained on train + val, the search's final model.

Val has done its job once it has chosen the configuration; a user's own script trains on every
labelled image, and so must the product (scikit-learn's search classes refit by default for the
same reason). The refit starts from the same shared start, runs the chosen trial's epochs and
schedule, keeps its last epoch, and is reported on test next to the val-selected trial. It is a
job of the training service: alone, on a whole node.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainables.checkpoint import Checkpoint
from trainables.config import TrainConfig
from trainables.jobs import TrainJob, train
from trainables.split import Split
from trainables.start import Start
from trainables.store import ExperimentStore

log = logging.getLogger("search")


@dataclass
class Refit:
    """The trained refit: its checkpoint, its record for summary.json and its per-epoch
    reports (empty when a resumed search found it finished)."""

    path: Path
    record: dict
    reports: list[dict]


def refit(store: ExperimentStore, data, split: Split, starts: dict[str, Start],
          train_cfg: TrainConfig, progress=None, what: str = "the selected configuration"
          ) -> Refit:
    """Trains `train_cfg` (the selected trial's, or a --recipe-only run's recipe) on train +
    val (`data` may be a Ray object ref). A refit already on disk for the same configuration (a
    resumed search) is not trained again; an interrupted one continues."""
    pool = np.concatenate([split.train, split.val])
    path = store.refit_checkpoint
    log.info("refit: %s on train + val (%d images), %s epoch(s)", what, len(pool),
             f"about {train_cfg.epochs}" if train_cfg.fit_by else train_cfg.epochs)
    tick = time.time()
    job = TrainJob(train_cfg, starts[train_cfg.model].inputs(
        data, pool, np.zeros(0, np.int64), split_hash=split.hash), path, name="refit")
    result = train([job], ray_dir=store.ray_dir, progress=progress)[0]
    trained = Checkpoint.load(path).train_config  # its epochs, where a deadline fitted them
    length = trained.length  # its last epoch may be a share of one
    record = {"checkpoint": store.relative(path),
              "epochs": int(length) if length.is_integer() else round(length, 2),
              "train_images": len(pool), "seconds": round(time.time() - tick, 1),
              "threads": result.resources.threads if result.resources else None,
              "config": dataclasses.asdict(trained)}
    return Refit(path, record, result.reports)
