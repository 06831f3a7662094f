"""The experiment folder: the one owner of every path, read and write in it.

Layout of `<storage>/<experiment>/`:
  config.yaml    the resolved search config          split.json    the split (indices, ids, hash)
  data.npz       decoded images (a cache)            init.pt       shared initial weights
  results.csv    one row per trial                   summary.json  best trial, val and test metrics
  mlflow.json    tracking URI and parent run id      optuna.db     the Optuna study
  checkpoints/<trial_id>/best.pt   each trial's best epoch (+ epoch_<n>.pt, trial.json)
  warm/          the warm start's run                refit/final.pt  the final model
  ensemble/      what ensemble.build writes (seeds/<trial>-seed<s>/best.pt: seed retrains)
  data_report/   the data report (trainables.eda)    model_report/<model>/  errors, Grad-CAM
  plots/, pareto.csv   pictures of the search, a multi-objective search's front
  folds/<key>/<trial_id>/fold<k>/best.pt   K-fold models (ensemble.build --folds)
  students/<name>/best.pt                  distilled students (ensemble.distill)
  ray/           Ray Tune's and Ray Train's own bookkeeping (trial folders, error files)
Every run of the training loop keeps its files in one folder beside its checkpoint: the
checkpoint, `resume.pt` while it runs (its last finished epoch), `epoch_<n>.pt` (kept last
epochs) and `epochs.json` (per-epoch reports); `finished` is the one rule that says a run is done.
Paths written inside the folder are relative to it, so a folder can be moved or copied. No Ray
and no MLflow here: the search writes through this module, ensembles (and anything else that
reads a finished search) read through it.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from trainables.errors import UserError
from trainables.files import atomic_write, read_json, write_json

if TYPE_CHECKING:
    from trainables.config import TrainConfig
    from trainables.data import ImageData
    from trainables.split import Split
    from trainables.start import Start

log = logging.getLogger(__name__)
FINISHED = ("completed", "stopped_early", "stopped_by_budget")  # trials with a usable result
ENDED = FINISHED + ("failed",)  # trials a resumed search does not run again
CHECKPOINT = "best.pt"  # a run's best epoch
RESUME = "resume.pt"  # a run's last finished epoch, while it has not finished
EPOCHS = "epochs.json"  # a run's per-epoch reports


# ---------------------------------------------------------------------- one run's folder


def resume_path(checkpoint: str | Path) -> Path:
    """Where the run that writes `checkpoint` keeps its last finished epoch while it runs."""
    return Path(checkpoint).with_name(RESUME)


def snapshot_path(checkpoint: str | Path, epoch: int) -> Path:
    """Where the run that writes `checkpoint` keeps epoch `epoch`'s weights (--keep-last)."""
    return Path(checkpoint).with_name(f"epoch_{epoch}.pt")


def snapshots(checkpoint: str | Path) -> list[Path]:
    """The kept last epochs beside `checkpoint`, oldest first."""
    found = Path(checkpoint).parent.glob("epoch_*.pt")
    return sorted(found, key=lambda p: int(p.stem.split("_")[1]))


def epochs_path(checkpoint: str | Path) -> Path:
    """Where a run's per-epoch reports are kept (for runs that are not Tune trials)."""
    return Path(checkpoint).with_name(EPOCHS)


def finished(checkpoint: str | Path, config: TrainConfig | None = None) -> bool:
    """The one rule for "is this run done?": its checkpoint is there, no resume state is left
    beside it, and (given `config`) it was trained with that recipe (how many threads trained
    it does not matter)."""
    path = Path(checkpoint)
    if not path.is_file() or resume_path(path).exists():
        return False
    if config is None:
        return True
    from trainables.checkpoint import Checkpoint

    return config.made(Checkpoint.load(path).train_config)


def outcome(epochs_run: int, planned: int) -> str:
    """How a trial that ended normally ended: all its epochs, or fewer (stopped by ASHA)."""
    return "completed" if epochs_run >= planned else "stopped_early"


def check_experiment_name(name: str | None) -> None:
    """Refuses an experiment name that is not one plain folder inside the storage folder
    (letters, digits, '.', '_', '-', starting with a letter or digit; so never '.' or '..'), so
    that nothing outside it is ever written or deleted."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or "") is None:
        raise UserError(f"--experiment must be a plain folder name (letters, digits, '.', '_', "
                        f"'-'), not {name!r}")


def rank_key(score: float, val_loss: float) -> tuple[float, float]:
    """The one ranking rule, for sort keys: the higher val score (accuracy, or macro-F1 with
    --metric f1) first, then the lower val loss."""
    return (-score, val_loss)


def score_column(metric: str) -> str:
    """The results-table column a search ranks its trials by."""
    return {"accuracy": "best_val_acc", "f1": "best_val_f1"}[metric]


def ranked(table: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Finished trials with a checkpoint first, ordered by `rank_key`; the rest after them."""
    if table.empty:
        return table
    usable = table["status"].isin(FINISHED) & (table["checkpoint"] != "")
    order = table.assign(_usable=usable).sort_values(
        ["_usable", score_column(metric), "best_val_loss"], ascending=[False, False, True],
        na_position="last")
    return order.drop(columns="_usable").reset_index(drop=True)


def code_version() -> dict[str, str]:
    """The git commit of this code (and whether it had local changes), for every record."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], text=True,
                                capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], text=True, capture_output=True,
                               timeout=10).stdout.strip()
        return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"package_version": version("imgsearch")}
        except PackageNotFoundError:
            return {"package_version": "unknown"}


class ExperimentStore:
    """One experiment folder. Cheap to create; nothing is read until asked."""

    def __init__(self, root: str | Path) -> None:
        self.dir = Path(root).expanduser().resolve()

    @classmethod
    def at(cls, storage: str | Path, experiment: str) -> ExperimentStore:
        return cls(Path(storage).expanduser().resolve() / experiment)

    @property
    def name(self) -> str:
        return self.dir.name

    # ------------------------------------------------------------------ paths

    def path(self, name: str) -> Path:
        """A file at the folder's top level (config.yaml, summary.json, optuna.db, ...)."""
        return self.dir / name

    def checkpoint(self, trial_id: str) -> Path:
        """Where a trial's best checkpoint lives."""
        return self.checkpoint_root / str(trial_id) / CHECKPOINT

    @property
    def checkpoint_root(self) -> Path:
        return self.dir / "checkpoints"

    def trial_record(self, trial_id: str) -> Path:
        """checkpoints/<trial>/trial.json: the trial's config, written when it starts."""
        return self.checkpoint(trial_id).with_name("trial.json")

    def warm_checkpoint(self, model: str, *, primary: bool = True) -> Path:
        """warm/best.pt: the warm start of the search's (first) architecture;
        warm/<model>/best.pt: each other architecture's."""
        return self.dir / "warm" / CHECKPOINT if primary else \
            self.dir / "warm" / model / CHECKPOINT

    @property
    def refit_checkpoint(self) -> Path:
        """refit/final.pt: the chosen configuration retrained on train + val."""
        return self.dir / "refit" / "final.pt"

    @property
    def ensemble_dir(self) -> Path:
        return self.dir / "ensemble"

    def seed_checkpoint(self, trial_id: str, seed: int) -> Path:
        """ensemble/seeds/<trial>-seed<seed>/best.pt: a trial's configuration retrained with
        another seed (ensemble.build --seeds)."""
        return self.ensemble_dir / "seeds" / f"{trial_id}-seed{seed}" / CHECKPOINT

    @property
    def data_report_dir(self) -> Path:
        """data_report/: the data report (trainables.eda) of the search's images."""
        return self.dir / "data_report"

    def model_report_dir(self, name: str) -> Path:
        """model_report/<name>/: errors and Grad-CAM of a model ('best_trial', 'ensemble')."""
        return self.dir / "model_report" / name

    @property
    def plots_dir(self) -> Path:
        return self.dir / "plots"

    @property
    def ray_dir(self) -> Path:
        """ray/: Ray Tune's experiment state and trial folders, Ray Train's runs."""
        return self.dir / "ray"

    def folds_dir(self, key: str) -> Path:
        """folds/<key>/: the models of one K-fold assignment of train + val; `key` names the
        assignment (K, seed, groups), so models of another assignment are never mixed in."""
        return self.dir / "folds" / key

    def fold_checkpoint(self, key: str, trial_id: str, fold: int) -> Path:
        """The model of one trial's configuration trained on all folds but `fold`."""
        return self.folds_dir(key) / str(trial_id) / f"fold{fold}" / CHECKPOINT

    def student_checkpoint(self, name: str) -> Path:
        """students/<name>/best.pt: a student distilled from an ensemble (ensemble.distill)."""
        return self.dir / "students" / name / CHECKPOINT

    def student_checkpoints(self) -> list[Path]:
        """Every finished student, by name."""
        root = self.dir / "students"
        found = sorted(root.glob(f"*/{CHECKPOINT}")) if root.is_dir() else []
        return [p for p in found if finished(p)]

    def relative(self, path: str | Path) -> str:
        """`path` as stored inside the folder: relative to it when it lies inside."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.dir))
        except ValueError:
            return str(path)

    def resolve(self, stored: str | Path) -> Path:
        """A path read from inside the folder, made absolute (relative ones are to the folder)."""
        p = Path(stored)
        return p if p.is_absolute() else self.dir / p

    def lock(self):
        """Takes the experiment's exclusive lock (a file beside its folder) for as long as the
        returned file stays open; a UserError when another process holds it. Two searches (or a
        search and a build) on one folder would mix each other's split, results and summary."""
        import fcntl

        try:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.dir.parent / f".{self.name}.lock", "a+")  # noqa: SIM115
        except OSError as exc:  # e.g. under /proc, a file in the way, no permission
            raise UserError(f"cannot create files in the storage folder {self.dir.parent} "
                            f"({exc.strerror or exc}); pass a writable --storage") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise UserError(f"experiment {self.name!r} in {self.dir.parent} is in use by another "
                            "search.run or ensemble.build; wait for it to end or pick another "
                            "--experiment") from None
        return handle

    def holds_search(self) -> bool:
        return self.path("config.yaml").is_file()

    def is_empty(self) -> bool:
        return not self.dir.exists() or not any(self.dir.iterdir())

    def siblings(self, marker: str = "config.yaml") -> list[str]:
        """Names of the experiments next to this one that hold `marker` (for error messages)."""
        root = self.dir.parent
        return sorted(p.name for p in root.iterdir() if (p / marker).is_file()) \
            if root.is_dir() else []

    # ------------------------------------------------------------------ config, data, split, init

    def write_config(self, doc: dict[str, Any]) -> None:
        atomic_write(self.path("config.yaml"), yaml.safe_dump(doc, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.path("config.yaml").read_text())

    @property
    def metric(self) -> str:
        """What the search ranks by ('accuracy' or 'f1'), from its config."""
        doc = self.read_config() if self.holds_search() else {}
        return (doc.get("train") or {}).get("metric") or doc.get("metric") or "accuracy"

    def write_data(self, data: ImageData) -> None:
        from trainables.data import save_image_data

        save_image_data(data, self.path("data.npz"))

    def read_data(self) -> ImageData:
        from trainables.data import load_image_data

        return load_image_data(self.path("data.npz"))

    def has_data(self) -> bool:
        return self.path("data.npz").is_file()

    def write_split(self, split: Split, ids: list[str] | None = None) -> None:
        write_json(self.path("split.json"), split.to_doc(ids))

    def read_split(self) -> Split:
        from trainables.split import Split

        path = self.path("split.json")
        return Split.from_doc(read_json(path), source=str(path))

    def read_split_doc(self) -> dict:
        """split.json as plain data (indices, ids, hash)."""
        return read_json(self.path("split.json"))

    def init_path(self, model: str | None = None, *, primary: bool = True) -> Path:
        """init.pt: the start of the search's (first) architecture; init-<model>.pt: the start
        of each other architecture a search over models trains."""
        if primary or model is None:
            return self.path("init.pt")
        return self.path(f"init-{model}.pt")

    def write_init(self, start: Start, *, primary: bool = True) -> None:
        """The weights every trial of `start.model` starts from, and where they came from."""
        start.save(self.init_path(start.model, primary=primary))

    def read_init(self, model: str | None = None) -> Start:
        """The start of `model` (init-<model>.pt when it has its own, else init.pt)."""
        from trainables.start import Start

        own = self.init_path(model, primary=False)
        return Start.load(own if model is not None and own.is_file() else self.init_path())

    def has_init(self, model: str | None = None, *, primary: bool = True) -> bool:
        return self.init_path(model, primary=primary).is_file()

    # ------------------------------------------------------------------ the trial table

    def write_results(self, table: pd.DataFrame) -> None:
        """Writes results.csv with checkpoint paths relative to the folder."""
        table = table.copy()
        if "checkpoint" in table:
            table["checkpoint"] = [self.relative(c) if c else "" for c in table["checkpoint"]]
        atomic_write(self.path("results.csv"), table.to_csv(index=False))

    def has_results(self) -> bool:
        return self.path("results.csv").is_file()

    def read_results(self) -> pd.DataFrame:
        """results.csv with trial ids as text and checkpoints as absolute paths ('' if none)."""
        table = pd.read_csv(self.path("results.csv"), dtype={"trial_id": str},
                            keep_default_na=False, na_values=[""])
        if "checkpoint" in table:
            table["checkpoint"] = [str(self.resolve(c)) if isinstance(c, str) and c else ""
                                   for c in table["checkpoint"]]
        return table

    def write_trial_record(self, trial_id: str, config: dict, *, replace: bool = False) -> None:
        """The trial's config, written when it starts, so a continued search can recognise an
        interrupted trial and give it its folder back (`replace`: a folder it took over)."""
        path = self.trial_record(trial_id)
        if replace or not path.is_file():
            write_json(path, {"trial_id": trial_id, "config": config})

    def trial_records(self) -> list[dict]:
        root = self.checkpoint_root
        return [read_json(p) for p in sorted(root.glob("*/trial.json"))] if root.is_dir() else []

    def write_adoptions(self, adopt: dict[str, str]) -> None:
        write_json(self.path("adopt.json"), adopt)

    def read_adoptions(self) -> dict[str, str]:
        p = self.path("adopt.json")
        return read_json(p) if p.is_file() else {}

    def started(self) -> bool:
        """Whether any trial ever started: before that, a folder holds no results to keep."""
        return self.has_results() or bool(self.trial_records())

    def usable_trials(self) -> pd.DataFrame:
        """Finished trials whose checkpoint is on disk, best first."""
        table = ranked(self.read_results(), self.metric)
        usable = table[table["status"].isin(FINISHED) & (table["checkpoint"] != "")]
        return usable[[Path(c).is_file() for c in usable["checkpoint"]]]

    # ------------------------------------------------------------------ summary and tracking

    def write_summary(self, doc: dict[str, Any]) -> None:
        write_json(self.path("summary.json"), doc)

    def read_summary(self) -> dict[str, Any] | None:
        p = self.path("summary.json")
        return read_json(p) if p.is_file() else None

    def write_tracking(self, doc: dict[str, Any]) -> None:
        """mlflow.json: the search's MLflow store and parent run, and where the folder was (so a
        moved experiment finds a store that moved with it)."""
        write_json(self.path("mlflow.json"), {**doc, "experiment_dir": str(self.dir.resolve())})

    def read_tracking(self, follow: bool = True) -> dict[str, Any] | None:
        """mlflow.json, its store followed when the experiment folder was moved together with a
        local store; a UserError when a local store it names is gone. `follow=False` (the user
        named the store with --tracking-uri, or the doc is only recorded): as written."""
        p = self.path("mlflow.json")
        if not p.is_file():
            return None
        doc = read_json(p)
        uri = doc.get("tracking_uri", "")
        scheme = next((s for s in ("sqlite:///", "file://") if uri.startswith(s)), None)
        if not follow or scheme is None or Path(uri[len(scheme):]).exists():
            return doc
        old, here = doc.get("experiment_dir"), self.dir.resolve()
        if old and Path(old) != here:
            moved = Path(os.path.normpath(here / os.path.relpath(uri[len(scheme):], old)))
            if moved.exists():
                log.warning("experiment %r moved from %s: using its MLflow store at %s",
                            self.name, old, moved)
                return doc | {"tracking_uri": scheme + str(moved)}
        raise UserError(f"the MLflow store {uri} of experiment {self.name!r} no longer exists "
                        "(was it moved or deleted?); pass --tracking-uri with where it is now")
