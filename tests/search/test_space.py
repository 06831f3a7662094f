"""The search space with a real Optuna study: ranges, log scale, choices, fixed values, pickling."""

from __future__ import annotations

import pickle

import optuna
import pytest
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from search.space import (
    SEARCHABLE,
    SpaceSampler,
    first_points,
    recommended_point,
    resolve_space,
)
from trainables.defaults import RECOMMENDED
from trainables.defaults import SPACE as DEFAULT_SPACE
from trainables.errors import UserError
from trainables.train import TrainConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "lr": {"low": 1e-4, "high": 1e-1, "log": True},
    "dropout": {"low": 0.0, "high": 0.3},
    "epochs": {"low": 2, "high": 6},
    "accum_steps": {"low": 1, "high": 8, "log": True},
    "batch_size": [16, 32, 64],
    "scheduler": ["cosine", "step"],
    "weight_decay": 0.01,
    "hflip": True,
}


def _ask(space: dict, n: int = 1, seed: int = 0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    sampler = SpaceSampler(space)
    out = []
    for _ in range(n):
        trial = study.ask()
        fixed = sampler(trial)
        out.append((trial, fixed))
        study.tell(trial, 0.0)
    return out


def test_ranges_are_in_bounds_with_the_right_type():
    for trial, _ in _ask(SPACE, n=40):
        p = trial.params
        assert isinstance(p["lr"], float) and 1e-4 <= p["lr"] <= 1e-1
        assert isinstance(p["dropout"], float) and 0.0 <= p["dropout"] <= 0.3
        assert isinstance(p["epochs"], int) and 2 <= p["epochs"] <= 6
        assert isinstance(p["accum_steps"], int) and 1 <= p["accum_steps"] <= 8
        assert p["batch_size"] in (16, 32, 64)
        assert p["scheduler"] in ("cosine", "step")


def test_distributions_follow_the_spec():
    trial, _ = _ask(SPACE)[0]
    d = trial.distributions
    assert isinstance(d["lr"], FloatDistribution) and d["lr"].log is True
    assert (d["lr"].low, d["lr"].high) == (1e-4, 1e-1)
    assert isinstance(d["dropout"], FloatDistribution) and d["dropout"].log is False
    assert isinstance(d["epochs"], IntDistribution) and d["epochs"].log is False
    assert isinstance(d["accum_steps"], IntDistribution) and d["accum_steps"].log is True
    assert isinstance(d["batch_size"], CategoricalDistribution)
    assert list(d["batch_size"].choices) == [16, 32, 64]
    assert list(d["scheduler"].choices) == ["cosine", "step"]


def test_log_scale_spreads_over_decades():
    lrs = [t.params["lr"] for t, _ in _ask({"lr": {"low": 1e-5, "high": 1e-1, "log": True}},
                                            n=200)]
    # uniform in log10: about a quarter per decade; uniform in value would put ~90% in the top one
    assert sum(lr < 1e-2 for lr in lrs) > 100
    assert sum(lr < 1e-3 for lr in lrs) > 50


def test_float_bounds_written_as_ints_stay_floats_when_mixed():
    trial, _ = _ask({"dropout": {"low": 0, "high": 0.5}})[0]
    assert isinstance(trial.distributions["dropout"], FloatDistribution)


def test_scalars_are_fixed_not_searched():
    trial, fixed = _ask(SPACE)[0]
    assert fixed == {"weight_decay": 0.01, "hflip": True}
    assert "weight_decay" not in trial.params and "hflip" not in trial.params
    # params + fixed together make a whole training config
    cfg = TrainConfig.from_dict({**trial.params, **fixed})
    assert cfg.weight_decay == 0.01 and cfg.hflip is True
    assert cfg.lr == trial.params["lr"]


def test_same_seed_same_proposals():
    a = [t.params for t, _ in _ask(SPACE, n=5, seed=3)]
    b = [t.params for t, _ in _ask(SPACE, n=5, seed=3)]
    c = [t.params for t, _ in _ask(SPACE, n=5, seed=4)]
    assert a == b and a != c


def test_sampler_is_picklable():
    sampler = SpaceSampler(SPACE)
    back = pickle.loads(pickle.dumps(sampler))
    assert back.space == SPACE
    t1, f1 = _ask(SPACE, seed=9)[0]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=9))
    t2 = study.ask()
    f2 = back(t2)
    assert t2.params == t1.params and f2 == f1


def test_default_space_samples():
    space = resolve_space(DEFAULT_SPACE, 10)
    for trial, fixed in _ask(space, n=10):
        assert fixed == {}
        assert 5 <= trial.params["epochs"] <= 10
        assert trial.params["scheduler"] in ("cosine", "onecycle", "step", "plateau")


# ---------------------------------------------------------------- resolve_space


@pytest.mark.parametrize("max_epochs, low", [(10, 5), (9, 5), (1, 1), (2, 1), (3, 2)])
def test_resolve_space_fills_epochs(max_epochs, low):
    space = resolve_space({"epochs": None, "lr": 0.01}, max_epochs)
    assert space["epochs"] == {"low": low, "high": max_epochs}
    assert space["lr"] == 0.01


def test_resolve_space_keeps_an_explicit_epochs_and_does_not_mutate():
    given = {"epochs": [2, 3], "batch_size": [8]}
    space = resolve_space(given, 5)
    assert space["epochs"] == [2, 3]
    missing = {"lr": 0.01}
    assert "epochs" not in resolve_space(missing, 4)  # epochs fixed outside the space
    assert missing == {"lr": 0.01}
    assert DEFAULT_SPACE["epochs"] is None
    resolve_space(DEFAULT_SPACE, 10)
    assert DEFAULT_SPACE["epochs"] is None


@pytest.mark.parametrize("space, needle", [
    ({"threads": [1, 2]}, "not a training setting"),
    ({"model": ["resnet10t"], "by_model": {"resnet18": {"lr": 0.1}}}, "does not offer"),
    ({"model": ["resnet10t"], "by_model": {"resnet10t": {"lr": {"low": 1}}}}, "low: A, high: B"),
    ({"model": ["resnet10t"], "by_model": [1]}, "must map model names"),
    ({"seed": [1, 2]}, "not a training setting"),
    ({"lr": {"low": 0.1}}, "low: A, high: B"),
    ({"lr": {"low": 0.1, "high": 0.2, "step": 1}}, "low: A, high: B"),
    ({"lr": {"low": "a", "high": 0.2}}, "numeric"),
    ({"lr": {"low": 0.2, "high": 0.1}}, "swap"),
    ({"lr": {"low": -1.0, "high": 0.1, "log": True}}, "positive"),
    ({"batch_size": []}, "empty list"),
    ({"batch_size": [16, 0]}, "positive"),
    ({"batch_size": [16.5]}, "whole number"),
    ({"epochs": {"low": 1, "high": 12}}, "max-epochs"),
    ({"dropout": 1.0}, r"\[0, 1\)"),
    ({"label_smoothing": [0.1, 1.2]}, r"\[0, 1\)"),
    ({"weight_decay": -0.1}, "negative"),
    ({"optimizer": ["adamw", "lion"]}, "lion"),
    ({"amp": "fp8"}, "fp8"),
    ({"augment": ["heavy"]}, "heavy"),
    ({"hflip": "yes"}, "true or false"),
    ({"mixup": "lots"}, "numeric"),
])
def test_resolve_space_rejects(space, needle):
    with pytest.raises(UserError, match=needle):
        resolve_space(space, 10)


def test_every_searchable_name_is_a_train_setting():
    fields = set(TrainConfig.__dataclass_fields__)
    assert SEARCHABLE <= fields
    assert {"seed", "threads"}.isdisjoint(SEARCHABLE) and "model" in SEARCHABLE


# ---------------------------------------------------------------- the recommended first trial


def test_recommended_point_in_the_default_space():
    point = recommended_point(resolve_space(DEFAULT_SPACE, 10))
    assert point == {k: v for k, v in RECOMMENDED.items() if k not in ("epochs", "batch_size")} \
        | {"epochs": 10, "batch_size": 32}  # the longest, the smallest batch offered


def test_a_search_first_measures_the_recipe_against_flips_only():
    space = resolve_space(DEFAULT_SPACE, 10)
    recipe, flips = first_points(space)
    assert recipe == recommended_point(space) and recipe["augment"] == "light"
    assert flips == recipe | {"augment": "none"} and flips["hflip"] is True
    for fixed in ({**DEFAULT_SPACE, "augment": "light"},  # not searched: nothing to measure
                  {**DEFAULT_SPACE, "augment": ["light", "strong"]}):  # flips only not offered
        assert first_points(resolve_space(fixed, 10)) == [recommended_point(
            resolve_space(fixed, 10))]


def test_recommended_point_is_fitted_into_a_users_space():
    space = resolve_space({
        "lr": {"low": 1e-5, "high": 1e-3, "log": True},    # recommended 3e-3 is above: clipped
        "batch_size": [128, 16],                            # the smallest offered, any order
        "scheduler": ["cosine", "onecycle"],                # offered: kept
        "label_smoothing": {"low": 0.15, "high": 0.2},      # default 0.1 below: clipped
        "mixup": {"low": 0.0, "high": 0.4},                 # default 0.0 in range: kept
        "epochs": {"low": 3, "high": 6},
        "dropout": 0.2,                                     # fixed: not a searched param
    }, 6)
    point = recommended_point(space)
    assert point == {"lr": 1e-3, "batch_size": 16, "scheduler": "onecycle",
                     "label_smoothing": 0.15, "mixup": 0.0, "epochs": 6}
    # the point is a valid trial of the space: Optuna accepts it as an enqueued trial
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(point)
    trial = study.ask()
    fixed = SpaceSampler(space)(trial)
    assert trial.params == point and fixed == {"dropout": 0.2}


# ---------------------------------------------------------------- architectures, conditional space


ARCHS = {
    "model": ["resnet10t", "mobilenetv3_small_050"],
    "lr": {"low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": [32, 64, 128],
    "by_model": {"mobilenetv3_small_050": {"lr": {"low": 1e-3, "high": 2e-3, "log": True},
                                           "batch_size": [16]}},
}


def test_a_conditional_space_samples_valid_configs_for_each_architecture():
    from search.space import training_values

    space = resolve_space(ARCHS, 10)
    seen = set()
    for trial, plain in _ask(space, n=40):
        config = training_values({**trial.params, **plain})
        seen.add(config["model"])
        cfg = TrainConfig.from_dict(config)  # a whole, valid training config
        if cfg.model == "mobilenetv3_small_050":
            assert 1e-3 <= cfg.lr <= 2e-3 and cfg.batch_size == 16
            assert "lr@mobilenetv3_small_050" in trial.params and "lr" not in trial.params
        else:
            assert 1e-4 <= cfg.lr <= 1e-1 and cfg.batch_size in (32, 64, 128)
            assert "lr" in trial.params
    assert seen == {"resnet10t", "mobilenetv3_small_050"}


def test_recommended_point_of_a_conditional_space_is_a_valid_trial():
    space = resolve_space(ARCHS, 10)
    point = recommended_point(space)
    assert point["model"] == "resnet10t" and point["lr"] == pytest.approx(2e-3)
    study = optuna.create_study()
    study.enqueue_trial(point)
    trial = study.ask()
    SpaceSampler(space)(trial)
    assert trial.params == point
    other = resolve_space({**ARCHS, "model": ["mobilenetv3_small_050", "resnet10t"]}, 10)
    assert recommended_point(other) == {"model": "mobilenetv3_small_050",
                                        "lr@mobilenetv3_small_050": 2e-3,
                                        "batch_size@mobilenetv3_small_050": 16}
