"""`--time-budget`: plan a search to fit the user's wall-clock budget.

Users think in "20 minutes" or "overnight", not in trials x epochs. From the measured training
speed, the data size and the resources, the plan decides how long the longest trial trains
(--max-epochs), how many trials run (--num-samples), the warm start's epochs and the time the
search may take, keeping time for the warm start before it and the refit after it. Tune stops the
search at its deadline, so the run ends within the budget with its results written.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from search.config import SearchConfig, validate
from search.resources import ResourcePlan
from search.space import default_epochs
from trainables.defaults import (
    EVAL_COST,
    FINISH_S,
    GOOD_EPOCHS,
    GPU_BATCHES,
    LONG_RECIPE_EPOCHS,
    MAX_EPOCHS,
    SLACK,
    SPACE,
    TRIALS_PER_SLOT,
    WARM_SHARE,
    warm_epochs,
)
from trainables.errors import UserError

log = logging.getLogger("search")


@dataclass(frozen=True)
class Speed:
    """Measured training seconds per image: one trial's worker, and one process alone."""

    trial: float
    solo: float


@dataclass(frozen=True)
class BudgetPlan:
    max_epochs: int
    num_samples: int
    warm_epochs: int | None
    search_s: float  # Tune's deadline for the search phase, from its start
    refit_s: float  # expected refit time (kept free after the search)
    warm_s: float
    trial_s: float
    per_slot: float = TRIALS_PER_SLOT  # full-length trials each concurrency slot has room for
    recipe: bool = False  # no search: the recommended recipe once, on the whole machine
    end_s: float = FINISH_S  # the run's end: test predictions, reports, records, shutdown

    def describe(self) -> str:
        if self.recipe:
            return (f"recipe only: the recommended recipe trains once, on train + val and the "
                    f"whole machine, for about {self.max_epochs} epochs (~{self.trial_s:.0f} s; "
                    f"its first epochs set the length to the time left); no warm start, trials "
                    f"or early stopping")
        warm = f"warm start {self.warm_epochs} epoch(s) ~{self.warm_s:.0f} s, " \
            if self.warm_epochs else ""
        return (f"{warm}search ~{self.search_s:.0f} s: up to {self.num_samples} trials of at "
                f"most {self.max_epochs} epochs (~{self.trial_s:.0f} s each), refit "
                f"~{self.refit_s:.0f} s")


def plan_budget(cfg: SearchConfig, *, remaining_s: float, speed: Speed, n_train: int,
                n_val: int, n_test: int, plan: ResourcePlan, warm: int) -> BudgetPlan:
    """The plan that fits `remaining_s` (the budget minus what the run has used already).

    With E the longest trial's epochs: each of the `warm` warm starts (one per architecture)
    takes WARM_SHARE * E epochs alone, the search TRIALS_PER_SLOT full trials per slot (one
    when two would leave E under GOOD_EPOCHS), the refit E epochs of train + val alone; E is the
    largest that fits (at most MAX_EPOCHS, or the user's --max-epochs).
    """
    epoch_trial = (n_train + EVAL_COST * n_val) * speed.trial  # one epoch of one trial
    epoch_solo = (n_train + EVAL_COST * n_val) * speed.solo
    refit_epoch = (n_train + n_val) * speed.solo if cfg.refit else 0.0
    end_s = FINISH_S + 2 * EVAL_COST * n_test * speed.solo  # test, plain and flipped
    usable = remaining_s * SLACK - end_s
    cap = epochs_cap(cfg)

    def longest(per_slot: float) -> int:
        per_epoch = WARM_SHARE * epoch_solo * warm + refit_epoch + per_slot * epoch_trial
        return int(min(cap, usable / per_epoch)) if usable > 0 else 0

    recipe_epoch = (n_train + n_val) * speed.solo  # the recipe trains on train + val
    per_slot = TRIALS_PER_SLOT
    epochs = longest(per_slot)
    if epochs < min(GOOD_EPOCHS, cap):
        per_slot, epochs = 1.0, longest(1.0)
    recipe = recipe_plan(cfg, usable, recipe_epoch, cap, epochs, remaining_s)
    if recipe is not None:
        return dataclasses.replace(recipe, end_s=end_s)
    if epochs < 1:
        per_epoch = WARM_SHARE * epoch_solo * warm + refit_epoch + epoch_trial
        need = (per_epoch + FINISH_S) / SLACK
        raise UserError(f"--time-budget leaves {max(remaining_s, 0):.0f} s after reading the "
                        f"data, and one epoch of this search needs about {need:.0f} s here; "
                        "give a larger budget, a smaller --image-size or model, or fewer images")
    warm_len = (cfg.warm_epochs or warm_epochs(epochs)) if warm else None
    warm_s = (warm_len or 0) * epoch_solo * warm
    refit_s = epochs * refit_epoch
    search_s = max(usable - warm_s - refit_s, epoch_trial)
    # ASHA lets about 1 in 3 trials run their full length, the rest stop at half or less
    trials = max(plan.concurrency, int(search_s * plan.concurrency / (0.6 * epochs * epoch_trial)))
    if "num_samples" in cfg.given:
        trials = min(trials, cfg.num_samples)
    return BudgetPlan(epochs, trials, warm_len, search_s, refit_s, warm_s,
                      epochs * epoch_trial, per_slot, end_s=end_s)


def epochs_cap(cfg: SearchConfig) -> int:
    """The longest a run may train: the user's --max-epochs, else MAX_EPOCHS (the plan's
    trials, the recipe and a refit stretched into time left over)."""
    return cfg.max_epochs if "max_epochs" in cfg.given else MAX_EPOCHS


def recipe_plan(cfg: SearchConfig, usable: float, recipe_epoch: float, cap: int,
                search_epochs: int, remaining_s: float) -> BudgetPlan | None:
    """The plan for --recipe-only, or for a budget too small for a search: when even one trial
    per slot gets fewer than GOOD_EPOCHS (a warm start, short trials and a refit would each be
    too short to beat a plain script, which is what happened at a budget of one script's time),
    the recommended recipe trains once, on train + val and the whole machine, as many epochs as
    fit (at most the cap): what a user's own script does. None when a search fits, or the user
    asked for trials (--num-samples)."""
    if not cfg.recipe_only and (search_epochs >= min(GOOD_EPOCHS, cap)
                                or "num_samples" in cfg.given):
        return None
    epochs = int(min(cap, usable / recipe_epoch)) if usable > 0 else 0
    if cfg.recipe_only and epochs < 1:
        need = (recipe_epoch + FINISH_S) / SLACK
        raise UserError(f"--time-budget leaves {max(remaining_s, 0):.0f} s after reading the "
                        f"data, and one epoch of the recipe needs about {need:.0f} s here; give "
                        "a larger budget, a smaller --image-size or model, or fewer images")
    if not cfg.recipe_only and epochs <= search_epochs:
        return None
    return BudgetPlan(epochs, 1, None, usable, 0.0, 0.0, epochs * recipe_epoch, 1.0, recipe=True)


def apply(cfg: SearchConfig, plan: BudgetPlan) -> SearchConfig:
    """The config with the plan's epochs, trials and warm start; an epochs range the user did
    not set follows the new --max-epochs. A recipe-only plan makes a --recipe-only config."""
    if plan.recipe:
        return recipe_config(cfg, plan.max_epochs, batch=long_recipe_batch(cfg, plan.max_epochs))
    space = dict(cfg.space)
    if space.get("epochs") == default_epochs(cfg.max_epochs):
        space["epochs"] = None
    grace = min(cfg.grace_period, plan.max_epochs) if cfg.grace_period else None
    return validate(dataclasses.replace(
        cfg, max_epochs=plan.max_epochs, num_samples=plan.num_samples, space=space,
        warm_epochs=plan.warm_epochs or cfg.warm_epochs, grace_period=grace))


def recipe_space(cfg: SearchConfig) -> dict:
    """The space with every searched setting fixed at its recommended value: the first
    architecture, with its own (`by_model`) entries."""
    from search.space import BY_MODEL, recommended_value

    model = cfg.space.get("model", cfg.train.model)
    model = model[0] if isinstance(model, list) else model  # the user's first architecture
    own = (cfg.space.get(BY_MODEL) or {}).get(model, {})
    space = {k: recommended_value(k, v) if isinstance(v, (dict, list)) else v
             for k, v in ({**cfg.space, **own}).items() if k not in (BY_MODEL, "model")}
    return space | {"model": model}


def long_recipe_batch(cfg: SearchConfig, epochs: int) -> int | None:
    """The batch a budgeted recipe of `epochs` epochs trains in place of its own (the smallest
    offered), or None to keep it: a run of LONG_RECIPE_EPOCHS or more takes the next batch the
    machine's default space offers (64 on a CPU): at K = 2's length it kept both the blood scans
    and the clothing photos under ~0.9x a plain script's errors, where 32 left the scans at 0.93x
    (benchmarks/RESULTS.md §0n). A batch list the user chose is theirs."""
    offered = cfg.space.get("batch_size")
    if epochs < LONG_RECIPE_EPOCHS or offered not in (SPACE["batch_size"], GPU_BATCHES):
        return None
    return sorted(offered)[1]


def recipe_config(cfg: SearchConfig, epochs: int | None = None,
                  batch: int | None = None) -> SearchConfig:
    """The --recipe-only config: `recipe_space` (so config.yaml says what trained), `epochs`
    (default: the recommended length), `batch` (default: the recipe's) and the start the recipe
    would have had without a warm start, which it has no time for."""
    space = recipe_space(cfg)
    if epochs is not None:
        space["epochs"] = epochs
    if batch is not None:
        space["batch_size"] = batch
    init = cfg.init
    if init in ("auto", "warm"):
        init = "pretrained" if cfg.pretrained or cfg.pretrained_file else "random"
    return validate(dataclasses.replace(
        cfg, max_epochs=cfg.max_epochs if "max_epochs" in cfg.given else epochs or cfg.max_epochs,
        num_samples=1, space=space, init=init,
        recipe_only=True, early_stopping="none", grace_period=None))
