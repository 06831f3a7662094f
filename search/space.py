"""The search space: an Optuna define-by-run function built from a small, validated spec.

A spec entry is one of
  {low: a, high: b, log: true|false}  a range (integers when both ends are integers),
  [v1, v2, ...]                       a categorical choice,
  a single value                      fixed, not searched (still logged as a param).
Any training setting of `trainables.TrainConfig` may be searched this way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trainables.config import SEARCHABLE, TrainConfig, check_value
from trainables.errors import UserError

# The six knobs every search tunes; ranges suit AdamW on small images and can be overridden.
DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"low": 5e-4, "high": 1e-2, "log": True},
    "weight_decay": {"low": 1e-5, "high": 0.1, "log": True},
    "batch_size": [32, 64, 128],
    "dropout": {"low": 0.0, "high": 0.3},
    "epochs": None,  # None: from half of --max-epochs up to --max-epochs
    "scheduler": ["cosine", "onecycle", "step", "plateau"],
}
# The first trial of a search (unless --no-start-with-default): a one-cycle AdamW recipe that
# trains small CNNs from scratch well in few epochs, so even a budget of a handful of trials has a
# strong baseline, and the search then has to beat it. Clipped into the user's space.
RECOMMENDED: dict[str, Any] = {
    "lr": 3e-3,
    "weight_decay": 0.02,
    "batch_size": 32,
    "dropout": 0.1,
    "scheduler": "onecycle",
    "epochs": "low",  # the short end of the epochs range: a quick baseline
}


def resolve_space(space: dict[str, Any], max_epochs: int) -> dict[str, Any]:
    """Fills the epochs default (an entry of None) and checks every entry; raises UserError on a
    bad one. A space without an epochs entry leaves epochs to the fixed training settings."""
    space = {k: v for k, v in space.items()}
    if "epochs" in space and space["epochs"] is None:
        space["epochs"] = default_epochs(max_epochs)
    for name, spec in space.items():
        _check_entry(name, spec, max_epochs)
    return space


def default_epochs(max_epochs: int) -> dict[str, int]:
    """The epochs range when the user sets none: from half of --max-epochs up to it."""
    return {"low": max(1, (max_epochs + 1) // 2), "high": max_epochs}


def recommended_point(space: dict[str, Any]) -> dict[str, Any]:
    """RECOMMENDED moved into `space`: one value per searched knob (fixed knobs are left out).

    A range takes the recommended value clipped to [low, high] (the training default, or the
    range's middle, for knobs without a recommendation); a choice takes the recommended value
    when offered, else the first choice.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    point: dict[str, Any] = {}
    for name, spec in space.items():
        want = RECOMMENDED.get(name, defaults.get(name))
        if isinstance(spec, dict):
            low, high = spec["low"], spec["high"]
            if want == "low" or not isinstance(want, (int, float)) or isinstance(want, bool):
                want = low if want == "low" else _middle(low, high, bool(spec.get("log")))
            value = min(max(want, low), high)
            ints = isinstance(low, int) and isinstance(high, int)
            point[name] = round(value) if ints else float(value)
        elif isinstance(spec, list):
            point[name] = want if want in spec else spec[0]
    return point


def _middle(low: float, high: float, log: bool) -> float:
    return (low * high) ** 0.5 if log else (low + high) / 2


class SpaceSampler:
    """Callable define-by-run space for `OptunaSearch`; returns the fixed entries as constants.

    A class rather than a closure so the searcher state (which holds it) can be pickled for
    resume.
    """

    def __init__(self, space: dict[str, Any]) -> None:
        self.space = space

    def __call__(self, trial) -> dict[str, Any]:
        fixed = {}
        for name, spec in self.space.items():
            if isinstance(spec, dict):
                low, high = spec["low"], spec["high"]
                if isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool):
                    trial.suggest_int(name, low, high, log=bool(spec.get("log", False)))
                else:
                    trial.suggest_float(name, float(low), float(high),
                                        log=bool(spec.get("log", False)))
            elif isinstance(spec, list):
                trial.suggest_categorical(name, spec)
            else:
                fixed[name] = spec
        return fixed


def _check_entry(name: str, spec: Any, max_epochs: int) -> None:
    where = f"search space entry {name!r}"
    if name not in SEARCHABLE:
        raise UserError(f"{where} is not a training setting; use one of "
                        f"{', '.join(sorted(SEARCHABLE))}")
    if isinstance(spec, dict):
        if set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
            raise UserError(f"{where} must look like {{low: A, high: B, log: true|false}}, "
                            f"not {spec}")
        values = [spec["low"], spec["high"]]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise UserError(f"{where} needs numeric low and high, not {spec}")
        if spec["low"] > spec["high"]:
            raise UserError(f"{where} has low {spec['low']} above high {spec['high']}; "
                            "swap them")
        if spec.get("log") and spec["low"] <= 0:
            raise UserError(f"{where} is log-scaled, so low must be positive, not {spec['low']}")
    elif isinstance(spec, list):
        if not spec:
            raise UserError(f"{where} is an empty list; give at least one value")
        values = spec
    else:
        values = [spec]
    for v in values:
        _check_value(name, v, max_epochs)


def _check_value(name: str, v: Any, max_epochs: int) -> None:
    where = f"search space entry {name!r}"
    check_value(name, v, where)
    if name == "epochs" and v > max_epochs:
        raise UserError(f"{where} allows {v} epochs, more than --max-epochs {max_epochs}; "
                        "raise --max-epochs or lower the range")
