"""--time-budget: durations, and plans that fit the budget (pure arithmetic, no training)."""

from __future__ import annotations

import pytest

from search.budget import BudgetPlan, Speed, apply, plan_budget
from search.config import parse_config
from search.resources import ResourcePlan
from trainables.cli import parse_duration
from trainables.defaults import GOOD_EPOCHS, LONG_RECIPE_EPOCHS
from trainables.errors import UserError

PLAN = ResourcePlan(workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0, trial_cpus=0.0,
                    concurrency=2)
CLOTHES = {"n_train": 3068, "n_val": 341, "n_test": 372}


@pytest.mark.parametrize("text, seconds", [("20m", 1200), ("1h30m", 5400), ("90s", 90),
                                           ("1.5h", 5400), ("900", 900), (900, 900),
                                           ("2m 30s", 150)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "20x", "-5m", "0", "m"])
def test_bad_durations_are_user_errors(text):
    with pytest.raises(UserError, match="time-budget"):
        parse_duration(text)


def test_bad_budget_flag_is_refused_at_parse_time():
    with pytest.raises(UserError, match="time-budget"):
        parse_config(["--time-budget", "soon"])


@pytest.mark.parametrize("budget", [600, 1400, 3600, 8 * 3600])
@pytest.mark.parametrize("warm", [True, False])
def test_plan_fits_the_budget(budget, warm):
    cfg = parse_config(["--data", "x", "--time-budget", str(budget)])
    speed = Speed(trial=1 / 70, solo=1 / 110)
    plan = plan_budget(cfg, remaining_s=budget - 20, speed=speed, plan=PLAN, warm=int(warm),
                       **CLOTHES)
    assert plan.warm_s + plan.search_s + plan.refit_s <= budget - 20
    if plan.recipe:  # too small for a search: see test_a_budget_of_one_script_trains_the_recipe
        assert budget == 600 and plan.num_samples == 1 and plan.trial_s <= plan.search_s
        return
    assert 1 <= plan.max_epochs <= 40 and plan.num_samples >= PLAN.concurrency
    assert (plan.warm_epochs is not None) == warm
    # the search gets room for about two full-length trials per slot, or one longer one where
    # two would be shorter than GOOD_EPOCHS
    assert plan.search_s >= plan.per_slot * plan.trial_s * 0.99
    applied = apply(cfg, plan)
    assert applied.max_epochs == plan.max_epochs and applied.num_samples == plan.num_samples
    assert applied.space["epochs"]["high"] == plan.max_epochs  # the default range follows


def test_a_larger_budget_trains_longer_and_tries_more():
    cfg = parse_config(["--data", "x", "--time-budget", "1h"])
    speed = Speed(trial=1 / 70, solo=1 / 110)
    small = plan_budget(cfg, remaining_s=900, speed=speed, plan=PLAN, warm=1, **CLOTHES)
    large = plan_budget(cfg, remaining_s=4 * 3600, speed=speed, plan=PLAN, warm=1, **CLOTHES)
    assert large.max_epochs > small.max_epochs and large.num_samples >= small.num_samples


def test_a_small_budget_gives_fewer_longer_trials():
    """Two trials per slot would be 8 epochs long here; one per slot trains at least 12."""
    cfg = parse_config(["--data", "x", "--time-budget", "800"])
    speed = Speed(trial=1 / 112, solo=1 / 220)
    plan = plan_budget(cfg, remaining_s=760, speed=speed, plan=PLAN, warm=1, **CLOTHES)
    assert plan.max_epochs >= GOOD_EPOCHS and plan.per_slot == 1
    assert plan.search_s >= plan.trial_s * 0.99 and plan.num_samples >= PLAN.concurrency
    assert plan.warm_s + plan.search_s + plan.refit_s <= 760


def test_given_options_cap_the_plan():
    cfg = parse_config(["--data", "x", "--time-budget", "8h", "--max-epochs", "12",
                        "--num-samples", "5", "--space", "epochs={low: 4, high: 12}"])
    plan = plan_budget(cfg, remaining_s=8 * 3600, speed=Speed(1 / 70, 1 / 110), plan=PLAN,
                       warm=1, **CLOTHES)
    assert plan.max_epochs == 12 and plan.num_samples == 5
    assert apply(cfg, plan).space["epochs"] == {"low": 4, "high": 12}  # the user's range stays


def test_a_budget_too_small_for_one_epoch_says_so():
    cfg = parse_config(["--data", "x", "--time-budget", "30s"])
    with pytest.raises(UserError, match="time-budget"):
        plan_budget(cfg, remaining_s=10, speed=Speed(1 / 20, 1 / 30), plan=PLAN, warm=1,
                    **CLOTHES)


def test_a_budget_of_one_script_trains_the_recipe_once_on_the_whole_machine():
    """At about one plain script's time (15 epochs of clothing-small on 2 cores, ~200 s), a
    warm start, 1-thread trials and a refit would each get ~5 epochs; the recipe alone gets all
    of it, with every CPU."""
    cfg = parse_config(["--data", "x", "--time-budget", "200", "--space",
                        "lr={low: 1e-3, high: 1e-2, log: true}"])
    speed = Speed(trial=1 / 110, solo=1 / 250)
    plan = plan_budget(cfg, remaining_s=190, speed=speed, plan=PLAN, warm=1, **CLOTHES)
    assert plan.recipe and plan.num_samples == 1 and plan.refit_s == 0 and not plan.warm_epochs
    assert plan.max_epochs >= 10 and plan.trial_s <= 190 * 0.92
    # it trains on train + val: its epochs are planned on those images, with no val pass
    per_epoch = (CLOTHES["n_train"] + CLOTHES["n_val"]) * speed.solo
    assert plan.trial_s == pytest.approx(plan.max_epochs * per_epoch)
    applied = apply(cfg, plan)
    assert applied.recipe_only and applied.num_samples == 1
    assert applied.early_stopping == "none" and applied.init == "random"
    assert applied.space["epochs"] == plan.max_epochs
    assert applied.space["lr"] == 2e-3 and applied.space["scheduler"] == "onecycle"
    assert not any(isinstance(v, (dict, list)) for v in applied.space.values())  # no search
    # a user who asked for trials, or a budget with room for a search, gets the search
    asked = parse_config(["--data", "x", "--time-budget", "200", "--num-samples", "4"])
    assert not plan_budget(asked, remaining_s=190, speed=speed, plan=PLAN, warm=1,
                           **CLOTHES).recipe
    assert not plan_budget(cfg, remaining_s=4 * 800, speed=speed, plan=PLAN, warm=1,
                           **CLOTHES).recipe


def test_a_long_budgeted_recipe_trains_the_next_batch_of_the_space():
    """Batches of 32 where the recipe is short, 64 (128 on a GPU's space) for a long one; the
    user's own batch list is kept."""
    def batch(args: list[str], epochs: int) -> int:
        cfg = parse_config(["--data", "x", "--time-budget", "400", *args])
        plan = BudgetPlan(epochs, 1, None, 400.0, 0.0, 0.0, 380.0, 1.0, recipe=True)
        return apply(cfg, plan).space["batch_size"]

    long, short = LONG_RECIPE_EPOCHS, LONG_RECIPE_EPOCHS - 1
    assert batch([], long) == 64 and batch([], short) == 32
    assert batch(["--space", "batch_size=[16,32,64]"], long) == 16
    assert batch(["--space", "batch_size=[64,128,256]"], long) == 128  # a GPU's (suit_machine)


def test_budgeted_runs_end_before_the_finish_and_within_their_cap():
    """The recipe and the refit get a deadline: the budget's end less the time the run's end
    needs, and a cap: the user's --max-epochs, else the plan's most; never below their own."""
    import time

    from search.budget import epochs_cap
    from search.stages import Clock, fit_to_clock
    from trainables.config import TrainConfig
    from trainables.defaults import EVAL_COST, FINISH_S, MAX_EPOCHS

    clock = Clock(t0=time.time() - 40, budget_s=100)
    cfg = fit_to_clock(TrainConfig(epochs=9), clock, cap=30)
    assert cfg.fit_cap == 30 and cfg.epochs == 9
    assert cfg.fit_by == pytest.approx(time.time() + 60 - FINISH_S, abs=1)
    assert fit_to_clock(TrainConfig(epochs=9), clock, cap=4).fit_cap == 9
    # the plan's end: FINISH_S and the test predictions (plain and mirrored) at the measured speed
    plan = plan_budget(parse_config(["--data", "x", "--time-budget", "100"]), remaining_s=60,
                       speed=Speed(trial=0.01, solo=0.005), plan=PLAN, warm=0, **CLOTHES)
    assert plan.end_s == pytest.approx(FINISH_S + 2 * EVAL_COST * CLOTHES["n_test"] * 0.005)
    cfg = fit_to_clock(TrainConfig(epochs=9), clock, cap=30, end_s=plan.end_s)
    assert cfg.fit_by == pytest.approx(time.time() + 60 - plan.end_s, abs=1)
    assert epochs_cap(parse_config(["--max-epochs", "7"])) == 7
    assert epochs_cap(parse_config([])) == MAX_EPOCHS
