"""Greedy vote weights and calibration on small hand-computed probability arrays."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble.combine import ece, ensemble_metrics, fit_vote_weights
from models.vote import hard_vote, soft_vote

A = np.array([[0.8, 0.2], [0.4, 0.6]])
B = np.array([[0.6, 0.4], [0.0, 1.0]])


def _noise(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    return rng.dirichlet(np.ones(c), size=n)


def test_fit_vote_weights_finds_the_perfect_member():
    rng = np.random.default_rng(0)
    n, c = 60, 4
    labels = rng.integers(0, c, n)
    perfect = np.full((n, c), 0.01)
    perfect[np.arange(n), labels] = 0.97
    members = [_noise(rng, n, c), perfect, _noise(rng, n, c), _noise(rng, n, c)]
    w = fit_vote_weights(members, labels)
    assert w.shape == (4,)
    assert w.sum() == pytest.approx(1.0)
    assert w.argmax() == 1
    # any noise in the mix lowers the true-class probability, so every round picks it
    np.testing.assert_allclose(w, [0, 1, 0, 0])


def test_fit_vote_weights_selects_complementary_members():
    n = 20
    labels = np.zeros(n, dtype=np.int64)
    right_first = np.tile([0.9, 0.1], (n, 1))
    right_first[n // 2:] = [0.1, 0.9]
    right_second = right_first[::-1].copy()
    # either alone: half at p=0.9, half at p=0.1 (NLL 1.20); together p=0.5 everywhere (NLL 0.69)
    w = fit_vote_weights([right_first, right_second], labels, rounds=24)
    assert (w > 0).all()
    np.testing.assert_allclose(w, [0.5, 0.5], atol=0.05)
    assert w.sum() == pytest.approx(1.0)


def test_fit_vote_weights_accuracy_metric():
    labels = np.array([0, 0, 0, 0])
    # always right but unsure (NLL 0.92)
    unsure = np.tile([0.4, 0.3, 0.3], (4, 1))
    # sure and right 3 times, badly wrong once (NLL 0.76, accuracy 0.75); mixed with fewer than
    # 9 copies of `unsure` it still gets the last sample wrong
    sure = np.array([[0.99, 0.005, 0.005]] * 3 + [[0.05, 0.9, 0.05]])
    by_acc = fit_vote_weights([unsure, sure], labels, metric="accuracy", rounds=5)
    np.testing.assert_allclose(by_acc, [1, 0])
    by_nll = fit_vote_weights([unsure, sure], labels, metric="nll", rounds=5)
    assert by_nll[1] > 0  # NLL takes `sure` first
    assert by_nll.sum() == pytest.approx(1.0)


def test_fit_vote_weights_accuracy_ties_broken_by_nll():
    labels = np.array([0, 1, 0])
    weak = np.array([[0.6, 0.4], [0.4, 0.6], [0.6, 0.4]])
    strong = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1]])
    np.testing.assert_allclose(fit_vote_weights([weak, strong], labels, metric="accuracy"), [0, 1])


def test_fit_vote_weights_ties_pick_the_lowest_index():
    labels = np.array([0, 1])
    same = np.array([[0.7, 0.3], [0.2, 0.8]])
    np.testing.assert_allclose(fit_vote_weights([same, same, same], labels, rounds=4),
                               [1, 0, 0])


def test_ece_is_zero_for_confident_correct_predictions():
    labels = np.array([0, 2, 1, 1])
    assert ece(np.eye(3)[labels], labels) == 0.0


def test_ece_hand_computed():
    probs = np.array([[0.95, 0.05], [0.15, 0.85], [0.65, 0.35], [0.25, 0.75]])
    labels = np.array([0, 0, 0, 1])  # confidences .95 .85 .65 .75; the .85 one is wrong
    # 5 bins: (.8, 1] holds .95 and .85 (acc .5, conf .9), (.6, .8] holds .65, .75 (acc 1, conf .7)
    assert ece(probs, labels, bins=5) == pytest.approx(0.5 * 0.4 + 0.5 * 0.3)
    # 15 bins: every sample alone: (.05 + .85 + .35 + .25) / 4
    assert ece(probs, labels) == pytest.approx(0.375)


def test_ensemble_metrics_adds_ece():
    probs = np.array([[0.95, 0.05], [0.15, 0.85], [0.65, 0.35], [0.25, 0.75]])
    labels = np.array([0, 0, 0, 1])
    out = ensemble_metrics(probs, labels)
    assert set(out) == {"accuracy", "f1", "loss", "ece"}
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["loss"] == pytest.approx(-np.log([0.95, 0.15, 0.65, 0.75]).mean())
    assert out["ece"] == pytest.approx(0.375)


def test_shape_and_weight_validation():
    with pytest.raises(ValueError, match="member 1"):
        soft_vote([A, np.ones((3, 2)) / 2])
    with pytest.raises(ValueError, match="empty"):
        soft_vote([])
    with pytest.raises(ValueError, match="non-negative"):
        soft_vote([A, B], weights=[1, -1])
    with pytest.raises(ValueError, match="all zero"):
        hard_vote([A, B], weights=[0, 0])
    with pytest.raises(ValueError, match="one value per member"):
        soft_vote([A, B], weights=[1, 2, 3])
    with pytest.raises(ValueError, match="labels"):
        fit_vote_weights([A, B], np.array([0, 2]))
    with pytest.raises(ValueError, match="metric"):
        fit_vote_weights([A, B], np.array([0, 1]), metric="f1")
    with pytest.raises(ValueError, match="labels"):
        ece(A, np.array([0]))


def test_building_ensembles_does_not_import_ray_tune():
    """ensemble.build reads the experiment folder without Ray Tune (and without Ray at all until
    --seeds retrains), so it starts fast and cannot drag Tune's state into a build."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import ensemble.build, sys; assert 'ray.tune' not in sys.modules, 'ray.tune'; "
            "assert 'ray' not in sys.modules, 'ray'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _row(name: str, acc: float, loss: float, prefer: int = 0):
    from ensemble.combiners import Combined
    from models.artifact import Vote

    val = {"accuracy": acc, "loss": loss, "f1": acc, "ece": 0.0}
    return Combined(name, [name], [1.0], val, dict(val), 100, 1.0, artifact=Vote([name], [1.0]),
                    prefer=prefer)


def test_the_refit_wins_within_two_standard_errors_and_loses_beyond_them():
    """Val figures of blood-cells-small at K = 4 (385 val images): the soup's lower NLL no longer
    beats the refit it ties; a row 1-2 standard errors ahead does not either (the refit's val is
    its trial's); a row more than two standard errors ahead still does."""
    from ensemble.combiners import choose

    refit = _row("refit", 0.9558, 0.2171, prefer=-1)
    soup = _row("last-epochs soup", 0.9506, 0.2071)
    assert choose([soup, refit], n_val=385).name == "refit"
    assert choose([soup, _row("best single", 0.9558, 0.2171)], n_val=385).name == \
        "last-epochs soup"  # without a refit the tied rows go by NLL
    near = _row("greedy soup", 0.97, 0.2)  # 1.4 points ahead: 1.6 SE (0.0087)
    assert choose([near, refit], n_val=385).name == "refit"
    assert choose([near, _row("best single", 0.9558, 0.2171)], n_val=385).name == "greedy soup"
    far = _row("weighted vote", 0.99, 0.3)  # 3.4 points ahead: beyond 2 SE (0.0101)
    assert choose([soup, refit, far], n_val=385).name == "weighted vote"
