"""Fitting votes and judging them: greedy vote weights, calibration, the metrics of a row.

Plain numpy over (N, C) probability arrays, so the choices an ensemble makes can be tested without
training anything. `member_probs` is a sequence of M such arrays or one (M, N, C) array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.vote import stack_probs
from trainables.metrics import classification_metrics

METRICS = ("nll", "accuracy")
_EPS = 1e-12  # probability floor for log-likelihoods, the same as classification_metrics


def fit_vote_weights(member_probs: Sequence[np.ndarray] | np.ndarray, labels: np.ndarray, *,
                     rounds: int = 25, metric: str = "nll") -> np.ndarray:
    """Soft-vote weights by greedy ensemble selection with replacement (Caruana et al. 2004).

    As in AutoGluon: start from an empty ensemble and, each round, add the member (repeats allowed)
    whose addition scores best on the given (validation) probabilities; weights are selection
    counts / rounds. Few, integer-like weights overfit a small validation set less than freely
    optimised ones. Deterministic: ties go to the lowest member index.

    Args:
        member_probs: M arrays of shape (N, C), or one (M, N, C) array, on validation data.
        labels: (N,) integer true classes.
        rounds: Number of greedy additions (AutoGluon uses about 25).
        metric: "nll" (mean negative log-likelihood, lower is better) or "accuracy" (higher is
            better, ties broken by NLL).

    Returns:
        A float64 array of M weights summing to 1.
    """
    probs = stack_probs(member_probs)
    labels = _check_labels(labels, probs.shape[1], probs.shape[2])
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    m, n, _ = probs.shape
    true_p = probs[:, np.arange(n), labels]  # (M, N): all the NLL needs
    total = np.zeros(probs.shape[1:])
    total_true = np.zeros(n)
    counts = np.zeros(m, dtype=np.int64)
    for k in range(1, rounds + 1):
        nll = -np.log(np.clip((total_true + true_p) / k, _EPS, 1.0)).mean(axis=1)  # (M,)
        if metric == "accuracy":
            correct = np.array([((total + probs[i]).argmax(1) == labels).sum() for i in range(m)])
            nll = np.where(correct == correct.max(), nll, np.inf)
        best = int(np.argmin(nll))  # argmin returns the first (lowest) index on ties
        counts[best] += 1
        total += probs[best]
        total_true += true_p[best]
    return counts / rounds


def ece(probs: np.ndarray, labels: np.ndarray, *, bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence, with equal-width bins.

    Bins are (b/bins, (b+1)/bins], the first one closed at 0 (Guo et al. 2017). ECE is the
    sample-weighted mean |accuracy - confidence| over bins: 0 means confidence can be taken at
    face value, which accuracy and macro-F1 do not tell.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, C), got {probs.shape}")
    labels = _check_labels(labels, probs.shape[0], probs.shape[1])
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    gap = np.bincount(which, correct, bins) - np.bincount(which, conf, bins)
    return float(np.abs(gap).sum() / len(labels))


def ensemble_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1, NLL ("loss") and ECE: the same row for every member and combiner."""
    return classification_metrics(np.asarray(probs), np.asarray(labels)) | {
        "ece": ece(probs, labels)}


def _check_labels(labels: np.ndarray, n: int, c: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the probabilities, "
                         f"got {labels.shape}")
    if n == 0:
        raise ValueError("no samples: labels and probabilities are empty")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must be integers in [0, {c}), got {labels.dtype} values in "
                         f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64, copy=False)
