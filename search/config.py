"""One typed, frozen config for a search: defaults < YAML file (--config) < command-line flags.

Search options are fields here; training settings come from `trainables.config.TrainConfig` (the
one list of them) and reach every trial through `SearchConfig.train`, unless the search space
varies them. The options every entry point shares come from `trainables.cli.CommonOptions`, the
defaults from `trainables.defaults`. A leaf module: it imports neither torch nor the planner.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from search.space import resolve_space
from trainables import defaults
from trainables.cli import CommonOptions, add_options, opt, parse_duration, read_yaml, typed
from trainables.config import OPTIONS, SETTINGS, TrainConfig, check_value
from trainables.errors import UserError

SEARCH = defaults.SEARCH

@dataclass(frozen=True)
class SearchConfig(CommonOptions):
    """Every option of `python -m search.run`; the field help is the `--help` text."""

    # data
    data: str | None = opt(None, "Labelled images: a folder of class folders, a folder with "
                            "train/ (val/, test/) class folders, or a CSV. Default: the built-in "
                            "scikit-learn digits.")
    label_col: str = opt("target", "CSV column holding class labels.")
    group_col: str | None = opt(None, "CSV column of groups (e.g. a patient id) whose images "
                                "must stay in one split (train, val or test) together.")
    on_bad_image: str = opt("skip", "What to do with an unreadable image: 'skip' it with a "
                             "warning naming the file, or 'error' and stop.",
                             choices=("skip", "error"))
    image_size: int | None = opt(None, "Side in pixels images are decoded to once (default: 32 "
                                  "for the digits, 64 for --data).")
    data_path: str = opt("auto", "Where the decoded images live: memory (one copy in Ray's "
                         "object store, read zero-copy by every trial), stream (decoded once "
                         "over the cluster's CPUs into a cache under --storage that trials read "
                         "batch by batch: for data larger than memory), or auto: stream when the "
                         "decoded size exceeds half the object store of the smallest node.",
                         choices=("auto", "memory", "stream"))
    val_fraction: float = opt(SEARCH["val_fraction"], "Share of the images held out for "
                              "validation (model selection).")
    test_fraction: float = opt(SEARCH["test_fraction"], "Share of the images held out for the "
                               "final test report (never seen by the search).")
    # model and training
    pretrained: bool = opt(False, "Start from timm's pretrained weights (needs a network unless "
                            "--pretrained-file is given).")
    pretrained_file: str | None = opt(None, "Local pretrained weights file for --model "
                                       "(.pth, .bin or .safetensors).")
    init: str = opt("auto", "The shared start every trial fine-tunes from: pretrained (timm's "
                    "weights, or --pretrained-file), warm (the recommended recipe trained for "
                    "--warm-epochs on the train split first), random (one seeded random "
                    "initialisation), or auto: pretrained when weights are given, else warm.",
                    choices=("auto", "pretrained", "warm", "random"))
    warm_epochs: int | None = opt(None, "Epochs of the warm start (default: a third of "
                                  "--max-epochs, at least 1).")
    refit: bool = opt(True, "After the search, retrain the chosen configuration on train + val "
                      "as the final model, reported on test next to the val-selected trial.")
    recipe_only: bool = opt(False, "No search: train the recommended recipe (fitted into the "
                            "space) once, on every labelled image (train + val) and the whole "
                            "machine, as the final model, reported on test. What --time-budget "
                            "chooses by itself when the budget fits no search worth running.")
    train: TrainConfig = field(default_factory=TrainConfig)  # fixed settings: flags of their own
    given: list = field(default_factory=list)  # options the user set (a budget plan keeps them)
    space: dict = opt(defaults.SPACE, "Search space, from YAML or repeated --space "
                       "NAME=SPEC (e.g. --space 'lr={low: 1e-4, high: 1e-2, log: true}', "
                       "--space 'batch_size=[32,64]', --space dropout=0.1 to fix a knob).",
                       cli=False)
    # search
    search_algorithm: str = opt("optuna", "How trials are proposed: optuna (TPE, define-by-run "
                                "space) or random.", choices=("optuna", "random"))
    objective: str = opt("accuracy", "What the search optimises: the val score (--metric), or "
                         "the score against cost: accuracy,latency (measured milliseconds per "
                         "image) or accuracy,params. A multi-objective search keeps the Pareto "
                         "front (pareto.csv) and still reports its best-scoring trial on test.",
                         choices=("accuracy", "accuracy,latency", "accuracy,params"))
    early_stopping: str = opt("asha", "Stop weak trials at rungs (asha) or run every trial to "
                              "its epochs (none).", choices=("asha", "none"))
    num_samples: int = opt(SEARCH["num_samples"], "Number of trials.")
    max_epochs: int = opt(SEARCH["max_epochs"], "Most epochs a trial may train (the top of the "
                          "epochs range and ASHA's budget; 6 for the built-in digits).")
    grace_period: int | None = opt(None, "ASHA's first rung, in epochs of a --max-epochs-long "
                                   "trial (default: half of --max-epochs). Rungs compare trials "
                                   "at the same share of their own schedule, so a shorter trial "
                                   "is judged after proportionally fewer epochs.")
    reduction_factor: int = opt(SEARCH["reduction_factor"], "ASHA keeps about 1 in this many "
                                "trials at each rung.")
    start_with_default: bool = opt(True, "Run a recommended configuration (one-cycle AdamW, "
                                   "fitted into the space) as the first trial, so even a small "
                                   "budget has a strong baseline to beat, and (where "
                                   "augmentation is searched) the same with flips only as the "
                                   "second, so the search measures first which the data wants.")
    time_budget: str | None = opt(None, "Wall-clock budget of the whole run, e.g. 20m, 1h30m, "
                                  "900s or 900 (seconds): the trials, their epochs, the warm "
                                  "start and the refit are planned from the measured training "
                                  "speed to fit it, and the run ends within it with its results "
                                  "written. --max-epochs and --num-samples, when given, cap the "
                                  "plan.")
    seed: int = opt(0, "Seed of the split, the initial weights, the data order and the search.")
    max_failures: int = opt(1, "Times a failing trial is retried before it is marked failed.")
    # resources
    workers_per_trial: int = opt(1, "Training processes per trial; above 1 the trial runs as "
                                  "DDP through a Ray Train TorchTrainer.")
    cpus_per_worker: float | None = opt(None, "CPUs per worker (default: 1, or what fits when "
                                         "a trial has several workers).")
    gpus_per_worker: float = opt(0.0, "GPUs per worker; fractions share a GPU between trials.")
    max_concurrent: int | None = opt(None, "Most trials at once (default: what the cluster's "
                                      "resources fit).")
    # what this invocation does with the experiment
    resume: bool = opt(False, "Continue an interrupted search in the same experiment without "
                        "rerunning finished trials; interrupted trials continue after their last "
                        "finished epoch. Resources and --num-samples may change; other changed "
                        "options are named and ignored.", cli_only=True)
    extend: int = opt(0, "Add this many trials to a finished (or interrupted) search of the same "
                      "experiment; the sampler continues from its whole history.", cli_only=True)
    overwrite: bool = opt(False, "Replace an existing experiment folder of the same name.",
                           cli_only=True)

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or (defaults.BUILTIN_IMAGE_SIZE if self.data is None
                                   else defaults.IMAGE_SIZE)

    @property
    def budget_s(self) -> float | None:
        """--time-budget in seconds."""
        return None if self.time_budget is None else parse_duration(self.time_budget)

    @property
    def resolved_warm_epochs(self) -> int:
        return self.warm_epochs or defaults.warm_epochs(self.max_epochs)

    @property
    def resolved_grace_period(self) -> int:
        return self.grace_period or defaults.grace_epochs(self.max_epochs)

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage).expanduser().resolve() / self.experiment

    def to_dict(self) -> dict[str, Any]:
        """Plain data (as config.yaml holds it): training settings under `train`."""
        return dataclasses.asdict(self)

    def flat_dict(self) -> dict[str, Any]:
        """Search options and training settings side by side, as a user writes them."""
        doc = self.to_dict()
        train = doc.pop("train")
        return doc | train

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SearchConfig:
        """Reads `to_dict`'s output back (a saved config.yaml); training settings may also be
        top-level keys, as configs written before they moved under `train` have them."""
        doc = dict(doc)
        train = {**{k: doc.pop(k) for k in OPTIONS if k in doc}, **(doc.pop("train", None) or {})}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known},
                   train=TrainConfig.from_dict(train))


def parse_config(argv: list[str] | None = None) -> SearchConfig:
    """Resolves defaults < --config YAML < flags, validates, and returns the frozen config.

    A training setting given a value (YAML key or flag) is fixed: it leaves the default search
    space. Fixing and searching one setting at the same level (both in the YAML file, or both as
    flags) is an error; a flag beats the YAML file either way.
    """
    args = build_parser().parse_args(argv)
    doc = load_yaml(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("config", "space")}
    # what the user set (a saved config.yaml says so itself), which a budget plan must keep
    given = set(doc.pop("given", None) or set(doc)) | set(flags) | (
        {"space"} if args.space else set())
    data = flags.get("data", doc.get("data"))
    space = dict(defaults.SPACE) | ({} if data else defaults.BUILTIN_SPACE)
    space["lr"] = {"pretrained": defaults.PRETRAINED_LR, "warm": defaults.WARM_LR}.get(
        _start_kind(flags, doc), space["lr"])
    train = dict(doc.pop("train", None) or {})  # a saved config.yaml's fallback values
    for source, values, entries in (("the config file", doc, doc.pop("space", None) or {}),
                                    ("the flags", flags, _space_flags(args.space))):
        fixed = {k: values.pop(k) for k in OPTIONS if k in values}
        both = sorted(set(fixed) & set(entries))
        if both:
            raise UserError(f"{', '.join(both)} is both fixed and searched in {source}; keep "
                            "either the value or the search space entry")
        for name in fixed:
            space.pop(name, None)
        train.update(fixed)
        space.update(entries)
        if source == "the config file":
            doc.update(values)
    doc.update(flags)
    if not data:
        doc.setdefault("max_epochs", defaults.BUILTIN_MAX_EPOCHS)
    if isinstance(doc.get("time_budget"), (int, float)) and not isinstance(doc["time_budget"],
                                                                          bool):
        doc["time_budget"] = str(doc["time_budget"])  # YAML reads 900 as a number
    doc["given"] = sorted(given)
    unknown = sorted(set(train) - set(SETTINGS))  # internal settings are known too
    if unknown:
        raise UserError(f"config file has unknown training setting(s) {', '.join(unknown)} "
                        "under train; see python -m search.run --help")
    search_opts = typed(SearchConfig, doc)
    train = typed(TrainConfig, train) | {"seed": search_opts.get("seed", SearchConfig.seed)}
    return validate(SearchConfig(**search_opts, train=TrainConfig(**train), space=space))


def _start_kind(flags: dict[str, Any], doc: dict[str, Any]) -> str:
    """What the trials fine-tune from (pretrained, warm or random: --init, with auto resolved as
    `search.start.resolved_init` does), which sets the default learning-rate range."""
    get = lambda k: flags.get(k, doc.get(k))  # noqa: E731 - flags beat the file
    init = get("init") or "auto"
    if init != "auto":
        return init
    return "pretrained" if get("pretrained") or get("pretrained_file") else "warm"


def _space_flags(items: list[str] | None) -> dict[str, Any]:
    entries = {}
    for item in items or []:
        name, _, spec = item.partition("=")
        if not spec:
            raise UserError(f"--space {item!r} must look like NAME=SPEC, e.g. "
                            "'lr={low: 1e-4, high: 1e-2, log: true}'")
        try:
            entries[name.strip()] = read_yaml(spec)
        except yaml.YAMLError:
            raise UserError(f"--space {item!r}: {spec!r} is not valid YAML") from None
    return entries


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m search.run",
        description="Hyperparameter search for an image classifier: Optuna proposes each trial, "
                    "Ray Tune runs them (ASHA stops weak ones), MLflow records everything.",
        epilog="Settings may also come from --config FILE.yaml; flags override the file.")
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (keys as below, "
                        "with underscores); flags given here override it.")
    add_options(parser, SearchConfig)
    training = parser.add_argument_group(
        "training settings", "Fixed for every trial when given; a setting given here leaves the "
        "default search space (search one with --space NAME=SPEC instead).")
    add_options(training, TrainConfig, only=OPTIONS)
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"config file {p} does not exist; pass an existing YAML file to --config")
    try:
        doc = read_yaml(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {p} is not valid YAML ({str(exc).splitlines()[0]}); "
                        "fix the syntax") from None
    if not isinstance(doc, dict):
        raise UserError(f"config file {p} must hold a mapping of option: value")
    known = {f.name for f in dataclasses.fields(SearchConfig)} | set(OPTIONS)
    doc = {str(k).replace("-", "_"): v for k, v in doc.items()}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise UserError(f"config file {p} has unknown option(s) {', '.join(unknown)}; see "
                        "python -m search.run --help")
    for key in ("space", "train"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise UserError(f"config file {p}: {key} must be a mapping of setting: value, not "
                            f"{doc[key]!r}")
    for k in ("resume", "overwrite", "extend"):
        doc.pop(k, None)  # actions of one invocation, not settings of an experiment
    return doc


def check_apart(data: str | None, experiment_dir: Path, tracking_here: bool = False) -> None:
    """The user's images and the experiment folder must not hold one another: --overwrite would
    delete the images, and a later search would read its own results as a class of images."""
    if not data:
        return
    data_dir = Path(data).expanduser().resolve()
    data_dir = data_dir.parent if data_dir.is_file() else data_dir  # a CSV: its folder
    exp = experiment_dir.expanduser().resolve()
    if exp == data_dir or exp in data_dir.parents:
        raise UserError(f"--data {data} lies inside the experiment folder {exp}, which the "
                        "search writes (and --overwrite deletes); pick another --experiment or "
                        "--storage")
    if data_dir in exp.parents:
        raise UserError(f"the experiment folder {exp} lies inside --data {data}, so later "
                        "searches would read results as images; pass a --storage outside the "
                        "data folder (e.g. --storage ../runs)")
    here = Path.cwd().resolve()
    if tracking_here and (here == data_dir or data_dir in here.parents):
        raise UserError(f"this folder lies inside --data {data}, and MLflow would write its "
                        "store (mlflow.db, mlruns/) here among the images; run from outside the "
                        "data folder or pass --tracking-uri")


def validate(cfg: SearchConfig) -> SearchConfig:
    """Checks values a user can get wrong; returns the config with its space resolved."""
    checks = [
        (cfg.num_samples >= 1, "--num-samples must be at least 1"),
        (cfg.max_epochs >= 1, f"--max-epochs must be at least 1, not {cfg.max_epochs}"),
        (cfg.grace_period is None or 1 <= cfg.grace_period <= cfg.max_epochs,
         (f"--grace-period must be between 1 and --max-epochs {cfg.max_epochs}, "
          f"not {cfg.grace_period}")),
        (cfg.reduction_factor >= 2, "--reduction-factor must be at least 2"),
        (cfg.workers_per_trial >= 1, "--workers-per-trial must be at least 1"),
        (cfg.cpus_per_worker is None or cfg.cpus_per_worker > 0,
         "--cpus-per-worker must be positive"),
        (cfg.gpus_per_worker >= 0, "--gpus-per-worker must not be negative"),
        (cfg.max_concurrent is None or cfg.max_concurrent >= 1,
         "--max-concurrent must be at least 1"),
        (cfg.max_failures >= 0, "--max-failures must not be negative"),
        (cfg.warm_epochs is None or cfg.warm_epochs >= 1, "--warm-epochs must be at least 1"),
        (cfg.init != "pretrained" or cfg.pretrained or cfg.pretrained_file,
         "--init pretrained needs --pretrained (timm's weights) or --pretrained-file PATH"),
        (cfg.image_size is None or 8 <= cfg.image_size <= 1024,
         "--image-size must be between 8 and 1024"),
        (0 < cfg.val_fraction < 0.5 and 0 < cfg.test_fraction < 0.5,
         "--val-fraction and --test-fraction must be between 0 and 0.5"),
        (cfg.extend >= 0, "--extend must not be negative"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    cfg.check_common()
    check_apart(cfg.data, cfg.experiment_dir, tracking_here=not (
        cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")))
    if cfg.tracking_uri:  # a store that cannot be written fails now, before any work
        from trainables.tracking import resolve_tracking_uri

        resolve_tracking_uri(cfg.tracking_uri)
    if cfg.time_budget is not None:
        parse_duration(cfg.time_budget)
    for name in OPTIONS:
        check_value(name, getattr(cfg.train, name),
                    f"option {name} (--{name.replace('_', '-')})")
    space = resolve_space(cfg.space, cfg.max_epochs)
    if "epochs" not in space and cfg.train.epochs > cfg.max_epochs:
        raise UserError(f"option epochs is {cfg.train.epochs}, more than --max-epochs "
                        f"{cfg.max_epochs}; raise --max-epochs or lower epochs")
    from trainables.models import check_model_name, import_plugins

    import_plugins(cfg.train.plugins)
    models = space.get("model", cfg.train.model)
    for name in models if isinstance(models, list) else [models]:
        check_model_name(name)
    return dataclasses.replace(cfg, space=space)
