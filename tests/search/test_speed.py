"""The machine's speed as the budget plan times it: a first short timing, the rest only when
the plan needs it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from search.config import parse_config
from search.stages import speed
from trainables.speed import SpeedProbe

DATA = SimpleNamespace(images=np.zeros((8, 32, 32, 3), np.uint8), num_classes=3)


def _count_probes(monkeypatch) -> list[SpeedProbe]:
    made: list[SpeedProbe] = []
    init = SpeedProbe.__init__

    def record(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(SpeedProbe, "__init__", record)
    return made


@pytest.mark.parametrize("settled, timings", [(True, 1), (False, 3)])
def test_a_first_timing_that_settles_the_plan_is_the_answer_else_the_fastest_of_three(
        monkeypatch, settled, timings) -> None:
    cfg = parse_config(["--model", "resnet10t"])
    made = _count_probes(monkeypatch)
    asked: list[float] = []
    got = speed(cfg, DATA, ["resnet10t"], threads=1, batch=4,
                enough=lambda s: asked.append(s) or settled)
    assert len(made[0].timings) == timings and asked == made[0].timings[:1]
    assert 0 < got == min(made[0].timings) <= asked[0]
