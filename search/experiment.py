"""Opening a search's experiment folder: new, replaced (--overwrite) or resumed (--resume).

The folder's paths, reads and writes belong to `trainables.store.ExperimentStore`; this module
decides what a search may do with the folder.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass

from search.config import SearchConfig, validate
from trainables.data import ImageData, load_data
from trainables.errors import UserError
from trainables.split import Split, draw_split
from trainables.store import ExperimentStore

log = logging.getLogger("search")

KEEP_ON_RESUME = ("address", "num_cpus", "max_concurrent", "tracking_uri")


@dataclass
class Experiment:
    cfg: SearchConfig
    store: ExperimentStore
    resumed: bool

    @classmethod
    def open(cls, cfg: SearchConfig) -> Experiment:
        """Starts a new experiment folder or reopens one for --resume; never clobbers silently."""
        store = ExperimentStore(cfg.experiment_dir)
        if cfg.resume:
            if not store.holds_search():
                raise UserError(f"no experiment {cfg.experiment!r} to resume in "
                                f"{store.dir.parent} (found: "
                                f"{', '.join(store.siblings()) or 'none'}); pass --experiment "
                                "NAME or start a new search without --resume")
            doc = store.read_config()
            doc.update({k: getattr(cfg, k) for k in KEEP_ON_RESUME if getattr(cfg, k) is not None})
            doc.update(storage=cfg.storage, experiment=cfg.experiment, resume=True,
                       overwrite=False)
            return cls(validate(SearchConfig.from_dict(doc)), store, True)
        if not store.is_empty() and not cfg.overwrite:
            raise UserError(f"experiment folder {store.dir} already holds a search; pass --resume "
                            "to continue it, --experiment NAME for a new one, or "
                            "--overwrite to replace it")
        return cls(cfg, store, False)

    def create(self, data: ImageData, split: Split) -> None:
        """Writes the folder of a new experiment, once its inputs are known to be good and the
        search is sure to start (the shared start is written when it is known)."""
        if self.resumed:
            return
        if self.store.dir.exists() and self.cfg.overwrite:
            shutil.rmtree(self.store.dir)
        self.store.dir.mkdir(parents=True, exist_ok=True)
        self.store.write_config(
            dataclasses.replace(self.cfg, resume=False, overwrite=False).to_dict())
        self.store.write_data(data)
        self.store.write_split(split, data.ids)

    def data_and_split(self) -> tuple[ImageData, Split]:
        """Decodes the data once (a resumed search reads its data.npz) and draws the split."""
        cfg = self.cfg
        if self.resumed and self.store.has_data():
            return self.store.read_data(), self.store.read_split()
        log.info("reading %s at %d px ...", cfg.data or "the built-in digits",
                 cfg.resolved_image_size)
        data = load_data(cfg.data, image_size=cfg.resolved_image_size, image_col=cfg.image_col,
                         label_col=cfg.label_col, on_bad_image=cfg.on_bad_image)
        split = draw_split(data.labels, val_fraction=cfg.val_fraction,
                           test_fraction=cfg.test_fraction, seed=cfg.seed,
                           predefined=data.splits, class_names=data.class_names)
        return data, split
