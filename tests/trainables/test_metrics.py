"""The numpy metrics agree with scikit-learn's on awkward cases."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss

from trainables.metrics import classification_metrics


@pytest.mark.parametrize("case", range(6))
def test_matches_sklearn(case):
    rng = np.random.default_rng(case)
    n, c = int(rng.integers(1, 40)), int(rng.integers(2, 7))
    probs = rng.dirichlet(np.ones(c) * 0.5, size=n)
    labels = rng.integers(0, c - 1 if case % 2 else c, size=n)  # odd cases: a class never occurs
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(1)))
    assert m["f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro",
                                             labels=np.arange(c), zero_division=0))
    assert m["loss"] == pytest.approx(log_loss(labels, probs, labels=np.arange(c)), rel=1e-6)


def test_perfect_and_wrong():
    probs = np.eye(3)[[0, 1, 2, 2]]
    assert classification_metrics(probs, np.array([0, 1, 2, 2]))["f1"] == 1.0
    assert classification_metrics(probs, np.array([1, 2, 0, 0]))["accuracy"] == 0.0
