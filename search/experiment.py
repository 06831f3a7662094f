"""The experiment folder: resolved config, data cache, split, initial weights, results.

Layout of `<storage>/<experiment>/`:
  config.yaml    the resolved search config        split.json   the split (indices + hash)
  data.npz       decoded images (cache)            init.pt      shared initial weights
  results.csv    one row per trial                 summary.json best trial, val and test metrics
  mlflow.json    tracking URI and parent run id    checkpoints/<trial_id>/best.pt
and Ray Tune's own experiment state (for --resume).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from search.config import SearchConfig, validate
from trainables.checkpoint import save_checkpoint
from trainables.data import ImageData, load_data, load_image_data, save_image_data
from trainables.errors import UserError
from trainables.split import Split, draw_split

log = logging.getLogger("search")

KEEP_ON_RESUME = ("address", "num_cpus", "max_concurrent", "tracking_uri")


@dataclass
class Experiment:
    cfg: SearchConfig
    dir: Path
    resumed: bool

    @classmethod
    def open(cls, cfg: SearchConfig) -> Experiment:
        """Starts a new experiment folder or reopens one for --resume; never clobbers silently."""
        d = cfg.experiment_dir
        if cfg.resume:
            saved = d / "config.yaml"
            if not saved.is_file():
                root = d.parent
                names = sorted(p.name for p in root.iterdir() if (p / "config.yaml").is_file()) \
                    if root.is_dir() else []
                raise UserError(f"no experiment {cfg.experiment!r} to resume in {root} "
                                f"(found: {', '.join(names) or 'none'}); pass --experiment NAME "
                                "or start a new search without --resume")
            doc = yaml.safe_load(saved.read_text())
            doc.update({k: getattr(cfg, k) for k in KEEP_ON_RESUME if getattr(cfg, k) is not None})
            doc.update(storage=cfg.storage, experiment=cfg.experiment, resume=True,
                       overwrite=False)
            return cls(validate(SearchConfig(**doc)), d, True)
        if d.exists() and any(d.iterdir()) and not cfg.overwrite:
            raise UserError(f"experiment folder {d} already holds a search; pass --resume "
                            "to continue it, --experiment NAME for a new one, or "
                            "--overwrite to replace it")
        return cls(cfg, d, False)

    def create(self, data: ImageData, split: Split,
               init: tuple[dict, list[float], list[float]]) -> None:
        """Writes the folder of a new experiment, once its inputs are known to be good."""
        if self.resumed:
            return
        if self.dir.exists() and self.cfg.overwrite:
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        doc = dataclasses.replace(self.cfg, resume=False, overwrite=False).to_dict()
        (self.dir / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        save_image_data(data, self.path("data.npz"))
        split.save(self.path("split.json"), data.ids)
        state, mean, std = init
        save_checkpoint({"model": state, "mean": mean, "std": std, "model_name": self.cfg.model},
                        self.path("init.pt"))

    def path(self, name: str) -> Path:
        return self.dir / name

    def data_and_split(self) -> tuple[ImageData, Split]:
        """Decodes the data once (a resumed search reads its data.npz) and draws the split."""
        cfg = self.cfg
        if self.resumed and self.path("data.npz").is_file():
            return load_image_data(self.path("data.npz")), Split.load(self.path("split.json"))
        log.info("reading %s at %d px ...", cfg.data or "the built-in digits",
                 cfg.resolved_image_size)
        data = load_data(cfg.data, image_size=cfg.resolved_image_size, image_col=cfg.image_col,
                         label_col=cfg.label_col, on_bad_image=cfg.on_bad_image)
        split = draw_split(data.labels, val_fraction=cfg.val_fraction,
                           test_fraction=cfg.test_fraction, seed=cfg.seed,
                           predefined=data.splits, class_names=data.class_names)
        return data, split

    def tracking(self) -> dict | None:
        p = self.path("mlflow.json")
        return json.loads(p.read_text()) if p.is_file() else None

    def save_tracking(self, doc: dict) -> None:
        self.path("mlflow.json").write_text(json.dumps(doc, indent=2))
