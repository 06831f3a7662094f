"""Voting over members' class probabilities: soft (weighted mean) and hard (majority) votes.

Plain numpy over (N, C) probability arrays; what a saved vote (`models.artifact.Vote`) predicts
with. `member_probs` is a sequence of M such arrays or one (M, N, C) array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_TIE_NUDGE = 1e-6  # what a hard-vote tie winner gets on top of its share, so argmax picks it


def soft_vote(member_probs: Sequence[np.ndarray] | np.ndarray,
              weights: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of the members' probabilities; the usual, best-calibrated vote.

    Args:
        member_probs: M arrays of shape (N, C), or one (M, N, C) array.
        weights: One non-negative weight per member, normalised to sum to 1; None is uniform.

    Returns:
        An (N, C) float64 array whose rows sum to 1 when the members' rows do.
    """
    probs = stack_probs(member_probs)
    return np.tensordot(normalized_weights(weights, len(probs)), probs, axes=1)

def hard_vote(member_probs: Sequence[np.ndarray] | np.ndarray,
              weights: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Majority vote of the members' top-1 classes, as (weighted) vote shares per class.

    Shares keep the vote comparable with the other combiners (same metrics, same argmax), but they
    are not calibrated: a class no member voted for has probability 0, so the NLL is poor by design.
    Ties between classes with equal top share are broken by the soft-vote probability: the
    soft-vote favourite among the tied classes gets a 1e-6 nudge (rows are renormalised), so argmax
    picks it instead of the lowest class index. A member's own top-1 tie goes to the lower index.

    Args:
        member_probs: M arrays of shape (N, C), or one (M, N, C) array.
        weights: One non-negative weight per member (votes count this much); None is uniform.

    Returns:
        An (N, C) float64 array of vote shares; rows sum to 1.
    """
    probs = stack_probs(member_probs)
    w = normalized_weights(weights, len(probs))
    m, n, c = probs.shape
    shares = np.zeros((n, c))
    votes = probs.argmax(axis=2)  # (M, N)
    for i in range(m):
        np.add.at(shares, (np.arange(n), votes[i]), w[i])
    tied = shares >= shares.max(axis=1, keepdims=True) - 1e-9  # float sums of equal weights
    ties = tied.sum(axis=1) > 1
    if ties.any():
        soft = np.tensordot(w, probs, axes=1)
        winner = np.where(tied, soft, -np.inf).argmax(axis=1)
        rows = np.flatnonzero(ties)
        shares[rows, winner[rows]] += _TIE_NUDGE
        shares[rows] /= shares[rows].sum(axis=1, keepdims=True)
    return shares

def normalized_weights(weights: Sequence[float] | np.ndarray | None, count: int) -> np.ndarray:
    """`count` non-negative weights scaled to sum to 1 (uniform for None); ValueError if invalid."""
    if weights is None:
        return np.full(count, 1.0 / count)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (count,):
        raise ValueError(f"weights must hold one value per member ({count}), got shape {w.shape}")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    if w.sum() == 0:
        raise ValueError("weights are all zero; give at least one member a positive weight")
    return w / w.sum()

def stack_probs(member_probs: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(M, N, C) float64, after checking that every member has the same (N, C) shape."""
    if isinstance(member_probs, np.ndarray):
        if member_probs.ndim != 3:
            raise ValueError(f"member_probs must have shape (M, N, C), got {member_probs.shape}")
        arrays = list(member_probs)
    else:
        arrays = [np.asarray(p) for p in member_probs]
    if not arrays:
        raise ValueError("member_probs is empty; pass at least one member's probabilities")
    first = arrays[0].shape
    if len(first) != 2:
        raise ValueError(f"member 0's probabilities must have shape (N, C), got {first}")
    for i, p in enumerate(arrays[1:], start=1):
        if p.shape != first:
            raise ValueError(f"member {i}'s probabilities have shape {p.shape}, "
                             f"member 0's have {first}; predict all members on the same images")
    return np.stack(arrays).astype(np.float64, copy=False)
