"""The search space: an Optuna define-by-run function built from a small, validated spec.

A spec entry is one of
  {low: a, high: b, log: true|false}  a range (integers when both ends are integers),
  [v1, v2, ...]                       a categorical choice,
  a single value                      fixed, not searched (still logged as a param).
Any training setting of `trainables.TrainConfig` may be searched this way. The default space, the
recommended first trial and their evidence are in `trainables.defaults`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trainables.config import SEARCHABLE, TrainConfig, check_value
from trainables.defaults import RECOMMENDED
from trainables.errors import UserError

BY_MODEL = "by_model"  # per-model entries: {model name: {knob: spec}}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def resolve_space(space: dict[str, Any], max_epochs: int) -> dict[str, Any]:
    """Fills the epochs default (an entry of None) and checks every entry; raises UserError on a
    bad one. A space without an epochs entry leaves epochs to the fixed training settings."""
    space = {k: v for k, v in space.items()}
    if "epochs" in space and space["epochs"] is None:
        space["epochs"] = default_epochs(max_epochs)
    for name, spec in space.items():
        if name != BY_MODEL:
            _check_entry(name, spec, max_epochs)
    _check_by_model(space, max_epochs)
    return space


def _check_by_model(space: dict[str, Any], max_epochs: int) -> None:
    """`by_model` maps models the space offers to entries of their own."""
    per_model = space.get(BY_MODEL)
    if per_model is None:
        return
    models = space.get("model")
    offered = models if isinstance(models, list) else [models] if models else []
    if not isinstance(per_model, dict) or not all(isinstance(v, dict)
                                                  for v in per_model.values()):
        raise UserError("search space entry 'by_model' must map model names to entries, e.g. "
                        "{efficientnet_b0: {lr: {low: 1e-4, high: 3e-3, log: true}}}")
    for model, spec in per_model.items():
        if model not in offered:
            raise UserError(f"search space entry 'by_model' names {model!r}, which the space's "
                            f"model entry does not offer ({', '.join(map(str, offered)) or 'none'})"
                            "; add it to model or drop it from by_model")
        for name, entry in spec.items():
            if name in ("model", BY_MODEL):
                raise UserError(f"by_model.{model} cannot set {name}")
            _check_entry(name, entry, max_epochs)


def default_epochs(max_epochs: int) -> dict[str, int]:
    """The epochs range when the user sets none: from half of --max-epochs up to it."""
    return {"low": max(1, (max_epochs + 1) // 2), "high": max_epochs}


def entries(space: dict[str, Any], model: str | None) -> dict[str, tuple[str, Any]]:
    """For a trial of `model`: each knob's Optuna parameter name and spec. A knob the space sets
    per model (`by_model: {efficientnet_b0: {lr: ...}}`) is its own parameter, `lr@efficientnet_b0`,
    because its range differs (Optuna's samplers learn each parameter name separately)."""
    override = (space.get(BY_MODEL) or {}).get(model, {}) if model is not None else {}
    out = {name: (name, spec) for name, spec in space.items() if name not in (BY_MODEL, "model")}
    out.update({name: (f"{name}@{model}", spec) for name, spec in override.items()})
    return out


def recommended_point(space: dict[str, Any]) -> dict[str, Any]:
    """RECOMMENDED moved into `space`: one value per searched parameter (fixed knobs are left
    out), keyed by Optuna parameter name.

    A range takes the recommended value clipped to [low, high] (the training default, or the
    range's middle, for knobs without a recommendation); a choice takes the recommended value
    when offered, else the first choice. The model is the first of a searched list.
    """
    point: dict[str, Any] = {}
    model = space.get("model")
    if isinstance(model, list):
        point["model"] = model = model[0]  # the user's first choice of architecture
    for name, (param, spec) in entries(space, model).items():
        if isinstance(spec, (dict, list)):
            point[param] = recommended_value(name, spec)
    return point


def shortest_epochs(space: dict[str, Any], fixed: int) -> int:
    """The fewest epochs a trial of `space` may train (`fixed`, the training setting, when the
    space does not search epochs), over every architecture's own entry."""
    specs = [space.get("epochs", fixed)] + [own["epochs"] for own in
                                            (space.get(BY_MODEL) or {}).values()
                                            if "epochs" in own]
    return max(1, min(int(s["low"]) if isinstance(s, dict) else
                      int(min(s)) if isinstance(s, list) else int(s) for s in specs))


def first_points(space: dict[str, Any]) -> list[dict[str, Any]]:
    """The trials a new search starts with: the recommended recipe, then, where the space
    searches augmentation, the same recipe with flips only.

    Augmentation is the setting whose best value changes most from one kind of image to
    another, and a budgeted search runs only a few trials: at 15 epochs, light augmentation beat
    flips only by 3.5 points on clothing photos and lost to it by 1.2 on blood-cell scans
    (RESULTS.md §0b). Measured side by side on the data's own val split, with everything else
    equal and the same schedule (so early stopping compares like with like), the search learns
    which the data wants before it samples anything else.
    """
    first = recommended_point(space)
    model = first.get("model", space.get("model"))
    param, spec = entries(space, model if isinstance(model, str) else None).get(
        "augment", ("augment", None))
    if isinstance(spec, list) and "none" in spec and first.get(param) != "none":
        return [first, first | {param: "none"}]
    return [first]


def recommended_value(name: str, spec: dict | list) -> Any:
    want = RECOMMENDED.get(name, _DEFAULTS.get(name))
    if isinstance(spec, list):
        if want in ("low", "high") and all(isinstance(v, (int, float)) for v in spec):
            return min(spec) if want == "low" else max(spec)
        return want if want in spec else spec[0]
    low, high = spec["low"], spec["high"]
    if want in ("low", "high"):
        want = low if want == "low" else high
    elif not isinstance(want, (int, float)) or isinstance(want, bool):
        want = _middle(low, high, bool(spec.get("log")))
    value = min(max(want, low), high)
    return round(value) if isinstance(low, int) and isinstance(high, int) else float(value)


def _middle(low: float, high: float, log: bool) -> float:
    return (low * high) ** 0.5 if log else (low + high) / 2


class SpaceSampler:
    """Callable define-by-run space for `OptunaSearch`: suggests the model first (when searched),
    then every knob with that model's spec; returns fixed entries and per-model knobs under their
    plain names, so a trial's config always has `lr`, whatever model it drew.

    A class rather than a closure so the searcher (which holds it) can be pickled by Tune.
    """

    def __init__(self, space: dict[str, Any]) -> None:
        self.space = space

    def __call__(self, trial) -> dict[str, Any]:
        plain: dict[str, Any] = {}
        model = None
        if "model" in self.space:
            model = plain["model"] = _suggest(trial, "model", self.space["model"])
        for name, (param, spec) in entries(self.space, model).items():
            value = _suggest(trial, param, spec)
            if param != name or not isinstance(spec, (dict, list)):
                plain[name] = value
        return plain


def _suggest(trial, param: str, spec: Any) -> Any:
    """The value of one parameter: suggested from a range or a choice, or the fixed value."""
    if isinstance(spec, dict):
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool):
            return trial.suggest_int(param, low, high, log=log)
        return trial.suggest_float(param, float(low), float(high), log=log)
    if isinstance(spec, list):
        return trial.suggest_categorical(param, spec)
    return spec


def training_values(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config as training settings: per-model parameters (`lr@model`) are left out,
    their values are under the plain names too."""
    return {k: v for k, v in config.items() if "@" not in k}


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
