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
