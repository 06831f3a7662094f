"""Model soups: state averaging, the greedy soup's guard, BatchNorm recalibration on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from ensemble.soup import average_states, greedy_soup, has_batchnorm, recalibrate_bn, uniform_soup

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", num_classes=3).eval()


def test_soup_of_identical_states_is_the_state():
    model = _resnet(0)
    state = model.state_dict()
    soup = uniform_soup([state, state, state])
    assert soup.keys() == state.keys()
    for key, value in state.items():
        assert soup[key].dtype == value.dtype
        torch.testing.assert_close(soup[key], value, rtol=1e-6, atol=1e-7)
    other = _resnet(1)
    other.load_state_dict(soup)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=1e-5, atol=1e-5)


def _pair() -> tuple[dict, dict]:
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([0.5], dtype=torch.float16),
         "bn.num_batches_tracked": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([1.5], dtype=torch.float16),
         "bn.num_batches_tracked": torch.tensor(7)}
    return a, b


def test_average_of_two_states():
    a, b = _pair()
    soup = average_states([a, b])
    torch.testing.assert_close(soup["w"], torch.tensor([2.0, 4.0]))
    assert soup["h"].dtype == torch.float16 and soup["h"].item() == 1.0
    assert soup["bn.num_batches_tracked"].item() == 3  # counters come from the first state
    weighted = average_states([a, b], weights=[3, 1])
    torch.testing.assert_close(weighted["w"], torch.tensor([1.5, 3.0]))
    assert a["w"].tolist() == [1.0, 2.0]  # inputs untouched


def test_mismatched_states_name_the_key():
    a, b = _pair()
    del b["h"]
    with pytest.raises(ValueError, match="'h'"):
        average_states([a, b])
    a, b = _pair()
    b["w"] = torch.zeros(3)
    with pytest.raises(ValueError, match="'w'"):
        average_states([a, b])


TARGET = torch.tensor([0.0, 0.0])
# three ingredients around the target (each about 1 away, their mean on it) and a harmful one
STATES = [{"w": torch.tensor(v)} for v in
          ([1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87], [5.0, 5.0])]


class _Score:
    """Higher when closer to TARGET; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, state: dict) -> float:
        self.calls += 1
        return -float(torch.linalg.norm(state["w"] - TARGET))


def test_greedy_soup_keeps_helpful_and_rejects_harmful():
    score = _Score()
    soup, chosen = greedy_soup(STATES, score)
    assert chosen == [0, 1, 2]
    torch.testing.assert_close(soup["w"], TARGET, atol=1e-6, rtol=0)
    best_single = max(_Score()(s) for s in STATES)
    assert _Score()(soup) >= best_single
    assert score.calls == 4 + 3  # each ingredient once, then one per candidate soup


def test_greedy_soup_with_given_order():
    score = _Score()
    soup, chosen = greedy_soup(STATES, score, order=[0, 3, 1, 2])
    assert chosen == [0, 1, 2]
    assert score.calls == 1 + 3  # the first soup, then one per candidate
    soup, chosen = greedy_soup([STATES[3], STATES[0]], _Score())
    assert chosen == [1]  # adding the harmful one would drop the score
    torch.testing.assert_close(soup["w"], STATES[0]["w"])
    with pytest.raises(ValueError, match="order"):
        greedy_soup(STATES, score, order=[0, 0])


@pytest.mark.parametrize("batch_size", [128, 5])
def test_recalibrate_bn_recomputes_running_stats(batch_size):
    model = _resnet(0)
    assert has_batchnorm(model)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    out = recalibrate_bn(model, images, mean=MEAN, std=STD, batch_size=batch_size)
    assert out is model and not model.training
    assert not torch.allclose(bn.running_mean, before)
    # one batch, or four equal ones averaged: the first BN's running mean is the channel mean of
    # the stem's first conv output over all images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.conv1[0](x).mean((0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-5)


def test_recalibrate_bn_leaves_a_model_without_batchnorm_alone():
    model = nn.Linear(4, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert not has_batchnorm(model)
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    assert recalibrate_bn(model, images, mean=MEAN, std=STD) is model
    with pytest.raises(ValueError, match="uint8"):
        recalibrate_bn(_resnet(0), images[:1], mean=MEAN, std=STD)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
