"""ASHA's rungs sit at shares of each trial's own schedule, on Ray's real scheduler."""

from __future__ import annotations

import pytest
from ray.tune.schedulers import ASHAScheduler

from search.config import parse_config
from search.tune import PROGRESS, asha_settings


def _milestones(args: list[str]) -> list[float]:
    scheduler = ASHAScheduler(**asha_settings(parse_config(args)))
    return sorted(m for m, _ in scheduler._brackets[0]._rungs)


def test_default_first_rung_is_half_of_every_schedule():
    (rung,) = _milestones([])  # max_epochs 10, grace default 5: one rung, at half
    for epochs in (5, 6, 10):
        judged_at = next(e for e in range(1, epochs + 1) if e / epochs >= rung)
        assert judged_at == -(-epochs // 2)  # ceil(epochs / 2)


@pytest.mark.parametrize("epochs, expected", [(10, [2, 6]), (5, [1, 3])])
def test_rungs_scale_with_a_trials_own_epochs(epochs, expected):
    rungs = _milestones(["--max-epochs", "10", "--grace-period", "2"])
    assert len(rungs) == 2  # 0.2 and 0.6 of the schedule
    # the epoch at which a trial of `epochs` epochs first reaches each rung (float-safe)
    got = [next(e for e in range(1, epochs + 1) if e / epochs >= r) for r in rungs]
    assert got == expected
    assert asha_settings(parse_config([]))["time_attr"] == PROGRESS


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def test_the_recommended_trial_runs_its_whole_schedule_and_still_sets_the_bar():
    """Ray's real ASHA, fed results by hand: the first trial (the recommended recipe) is behind
    at its rung and would be stopped, but continues; its rung score still stops a weaker one."""
    from ray.tune.schedulers import TrialScheduler

    from search.tune import protected_asha

    settings = asha_settings(parse_config(["--max-epochs", "10", "--grace-period", "5",
                                           "--reduction-factor", "2"]))
    metric = settings["metric"]
    scheduler = protected_asha(1, **settings)
    recipe, strong, weak = _Trial("recipe"), _Trial("strong"), _Trial("weak")
    for t in (recipe, strong, weak):
        scheduler.on_trial_add(None, t)

    def at_half(trial, score):
        return scheduler.on_trial_result(None, trial, {PROGRESS: 0.5, metric: score})

    assert at_half(strong, 0.9) == TrialScheduler.CONTINUE
    assert at_half(recipe, 0.5) == TrialScheduler.CONTINUE  # plain ASHA stops it here
    assert at_half(weak, 0.4) == TrialScheduler.STOP  # others are still stopped early
    plain = protected_asha(0, **settings)
    for t in (recipe, strong):
        plain.on_trial_add(None, t)
    plain.on_trial_result(None, strong, {PROGRESS: 0.5, metric: 0.9})
    assert plain.on_trial_result(None, recipe, {PROGRESS: 0.5, metric: 0.5}) == \
        TrialScheduler.STOP  # what the protection changes


def test_a_budgeted_search_starts_no_trial_that_cannot_run_its_shortest_schedule(tmp_path):
    """Near the search's deadline the sampler says it is finished rather than start a trial
    that would be cut off mid-schedule; with time left, or no deadline, it proposes."""
    import time

    import optuna
    from ray.tune.search import Searcher

    from search.space import SpaceSampler, shortest_epochs
    from search.tune import StudySearch

    cfg = parse_config(["--max-epochs", "12"])
    assert shortest_epochs(cfg.space, cfg.train.epochs) == 6  # half of --max-epochs
    assert shortest_epochs({**cfg.space, "epochs": [4, 9]}, 3) == 4
    assert shortest_epochs({"lr": 0.1}, 3) == 3

    def searcher(deadline):
        s = StudySearch(space=SpaceSampler(cfg.space), metric="best_val_acc", mode="max",
                        sampler=optuna.samplers.RandomSampler(seed=0), deadline=deadline,
                        min_epochs=6, study_name=f"s{deadline}",
                        storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}"))
        assert isinstance(s.suggest("a"), dict)  # no pace measured yet: it proposes
        s.on_trial_result("a", {"time_this_iter_s": 10.0, "best_val_acc": 0.5,
                                "training_iteration": 1})
        return s

    assert searcher(time.time() + 30).suggest("b") == Searcher.FINISHED  # 6 x 10 s > 30 s
    assert isinstance(searcher(time.time() + 600).suggest("b"), dict)
    assert isinstance(searcher(None).suggest("b"), dict)
