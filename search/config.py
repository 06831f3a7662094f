"""One typed, frozen config for a search: defaults < YAML file (--config) < command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from search.space import DEFAULT_SPACE, resolve_space
from trainables.errors import UserError


def default_storage() -> str:
    """Where experiment folders go: IMGSEARCH_STORAGE (the cluster image sets a shared file
    system there), else ./runs."""
    return os.environ.get("IMGSEARCH_STORAGE", "runs")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as text; read it as the number everybody means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$"
               r"|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: default, metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class SearchConfig:
    """Every option of `python -m search.run`; the field help is the `--help` text."""

    # data
    data: str | None = opt(None, "Labelled images: a folder of class folders, a folder with "
                            "train/ (val/, test/) class folders, or a CSV. Default: the built-in "
                            "scikit-learn digits.")
    image_col: str = opt("image_path", "CSV column holding image paths (relative to the CSV).")
    label_col: str = opt("target", "CSV column holding class labels.")
    on_bad_image: str = opt("skip", "What to do with an unreadable image: 'skip' it with a "
                             "warning naming the file, or 'error' and stop.",
                             choices=("skip", "error"))
    image_size: int | None = opt(None, "Side in pixels images are decoded to once (default: 32 "
                                  "for the digits, 64 for --data).")
    val_fraction: float = opt(0.15, "Share of the images held out for validation (model "
                               "selection).")
    test_fraction: float = opt(0.15, "Share of the images held out for the final test report "
                                "(never seen by the search).")
    # model and fixed training settings
    model: str = opt("resnet10t", "timm model name.")
    plugins: list = opt([], "Python module to import before models are built, e.g. one that "
                         "registers a custom timm model (repeatable).", cli_list=True)
    pretrained: bool = opt(False, "Start from timm's pretrained weights (needs a network unless "
                            "--pretrained-file is given).")
    pretrained_file: str | None = opt(None, "Local pretrained weights file for --model "
                                       "(.pth, .bin or .safetensors).")
    optimizer: str = opt("adamw", "Optimizer when not searched: adamw or sgd.",
                          choices=("adamw", "sgd"))
    augment: str = opt("light", "Augmentation policy: none, light or strong.",
                        choices=("none", "light", "strong"))
    hflip: bool = opt(False, "Add random horizontal flips (off: they change digits, letters "
                       "and hand signs).")
    amp: str = opt("auto", "Mixed precision: auto (fp16+GradScaler on CUDA, bf16 on CPUs with "
                    "native bf16), fp16, bf16 or off.", choices=("auto", "fp16", "bf16", "off"))
    accum_steps: int = opt(1, "Gradient accumulation: micro-batches per optimizer step.")
    label_smoothing: float = opt(0.0, "Label smoothing of the cross-entropy loss.")
    mixup: float = opt(0.0, "Mixup alpha (0 turns mixup off).")
    cutmix: float = opt(0.0, "CutMix alpha (0 turns CutMix off).")
    warmup_epochs: int = opt(0, "Linear learning-rate warmup epochs before the schedule.")
    grad_clip: float = opt(0.0, "Clip gradients to this global norm (0: no clipping).")
    space: dict = opt(DEFAULT_SPACE, "Search space, from YAML or repeated --space "
                       "NAME=SPEC (e.g. --space 'lr={low: 1e-4, high: 1e-2, log: true}', "
                       "--space 'batch_size=[32,64]', --space dropout=0.1 to fix a knob).",
                       cli=False)
    # search
    search_algorithm: str = opt("optuna", "How trials are proposed: optuna (TPE, define-by-run "
                                "space) or random.", choices=("optuna", "random"))
    early_stopping: str = opt("asha", "Stop weak trials at rungs (asha) or run every trial to "
                              "its epochs (none).", choices=("asha", "none"))
    num_samples: int = opt(10, "Number of trials.")
    max_epochs: int = opt(10, "Most epochs a trial may train (the top of the epochs range and "
                           "ASHA's budget).")
    grace_period: int | None = opt(None, "ASHA's first rung, in epochs of a --max-epochs-long "
                                   "trial (default: half of --max-epochs). Rungs compare trials "
                                   "at the same share of their own schedule, so a shorter trial "
                                   "is judged after proportionally fewer epochs.")
    reduction_factor: int = opt(3, "ASHA keeps about 1 in this many trials at each rung.")
    start_with_default: bool = opt(True, "Run a recommended configuration (one-cycle AdamW, "
                                   "fitted into the space) as the first trial, so even a small "
                                   "budget has a strong baseline to beat.")
    time_budget_s: float | None = opt(None, "Stop starting and running trials after this many "
                                       "seconds.")
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
    address: str | None = opt(None, "Ray cluster to join (default: RAY_ADDRESS, else start a "
                               "local Ray).")
    num_cpus: int | None = opt(None, "CPUs of the local Ray started when no cluster is given "
                                "(default: all).")
    # outputs
    experiment: str = opt("default", "Experiment name: the folder under --storage and the "
                           "MLflow experiment.")
    storage: str = opt(default_storage(), "Folder holding experiment folders (results, split, "
                       "checkpoints); on a multi-node cluster a shared file system (default: "
                       "IMGSEARCH_STORAGE, else ./runs).")
    tracking_uri: str | None = opt(None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                    "else sqlite:///mlflow.db here).")
    resume: bool = opt(False, "Continue an interrupted search in the same experiment without "
                        "rerunning finished trials.", cli_only=True)
    overwrite: bool = opt(False, "Replace an existing experiment folder of the same name.",
                           cli_only=True)

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or (32 if self.data is None else 64)

    @property
    def resolved_grace_period(self) -> int:
        return self.grace_period or max(1, self.max_epochs // 2)

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage).expanduser().resolve() / self.experiment

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_config(argv: list[str] | None = None) -> SearchConfig:
    """Resolves defaults < --config YAML < flags, validates, and returns the frozen config."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = load_yaml(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("config",
                                                                                  "space")}
    values.update(flags)
    space = dict(DEFAULT_SPACE)
    space.update(values.pop("space", None) or {})
    for item in args.space or []:
        name, _, spec = item.partition("=")
        if not spec:
            raise UserError(f"--space {item!r} must look like NAME=SPEC, e.g. "
                            "'lr={low: 1e-4, high: 1e-2, log: true}'")
        try:
            space[name.strip()] = read_yaml(spec)
        except yaml.YAMLError:
            raise UserError(f"--space {item!r}: {spec!r} is not valid YAML") from None
    return validate(SearchConfig(**typed(SearchConfig, values), space=space))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m search.run",
        description="Hyperparameter search for an image classifier: Optuna proposes each trial, "
                    "Ray Tune runs them (ASHA stops weak ones), MLflow records everything.",
        epilog="Settings may also come from --config FILE.yaml; flags override the file.")
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (keys as below, "
                        "with underscores); flags given here override it.")
    add_options(parser, SearchConfig)
    return parser


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field, with the field's help; every default is None (= unset)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if not f.metadata.get("cli", True):
            parser.add_argument(flag, action="append", metavar="NAME=SPEC", help=help_text)
            continue
        if f.metadata.get("cli_list"):
            parser.add_argument(flag, action="append", metavar=f.metadata.get("metavar", "MODULE"),
                                help=help_text)
            continue
        kind = _base_type(f.type)
        if f.default is not None and "default" not in help_text.lower():
            help_text += f" (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        choices = f.metadata.get("choices")
        parser.add_argument(flag, type=kind, default=None, choices=choices,
                            metavar=None if choices else f.name.upper(), help=help_text)


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
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    doc = {str(k).replace("-", "_"): v for k, v in doc.items()}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise UserError(f"config file {p} has unknown option(s) {', '.join(unknown)}; see "
                        "python -m search.run --help")
    for k in ("resume", "overwrite"):
        doc.pop(k, None)  # actions of one invocation, not settings of an experiment
    return doc


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
        (cfg.time_budget_s is None or cfg.time_budget_s > 0, "--time-budget-s must be positive"),
        (cfg.image_size is None or 8 <= cfg.image_size <= 1024,
         "--image-size must be between 8 and 1024"),
        (0 < cfg.val_fraction < 0.5 and 0 < cfg.test_fraction < 0.5,
         "--val-fraction and --test-fraction must be between 0 and 0.5"),
        (cfg.accum_steps >= 1, "--accum-steps must be at least 1"),
        (bool(cfg.experiment) and "/" not in cfg.experiment,
         f"--experiment must be a plain name, not {cfg.experiment!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    space = resolve_space(cfg.space, cfg.max_epochs)
    fixed = {k: getattr(cfg, k) for k in ("optimizer", "augment", "amp", "accum_steps",
                                          "label_smoothing", "mixup", "cutmix",
                                          "warmup_epochs", "grad_clip", "hflip")}
    resolve_space({k: v for k, v in fixed.items()}, cfg.max_epochs)  # same value checks
    from trainables.models import check_model_name, import_plugins

    import_plugins(cfg.plugins)
    check_model_name(cfg.model)
    return dataclasses.replace(cfg, space=space)


def typed(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Checks each option's value against its declared type (ints may stand for floats)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name, value in values.items():
        f = fields[name]
        kind = _base_type(f.type)
        optional = "None" in str(f.type)
        if value is None and optional:
            out[name] = value
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            out[name] = value
        else:
            raise UserError(f"option {name} must be {_KIND_NAMES.get(kind, kind.__name__)}, "
                            f"not {value!r}; fix it in the config file or flags")
    return out


_KIND_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def _base_type(tp: Any) -> type:
    if isinstance(tp, str):
        tp = eval(tp, {"dict": dict, "list": list})  # annotations are strings (PEP 563)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp
