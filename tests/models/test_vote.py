"""Soft and hard votes on small hand-computed probability arrays."""

from __future__ import annotations

import numpy as np

from models.vote import hard_vote, soft_vote

A = np.array([[0.8, 0.2], [0.4, 0.6]])
B = np.array([[0.6, 0.4], [0.0, 1.0]])


def test_soft_vote_is_the_mean():
    np.testing.assert_allclose(soft_vote([A, B]), [[0.7, 0.3], [0.2, 0.8]])
    np.testing.assert_allclose(soft_vote(np.stack([A, B])), [[0.7, 0.3], [0.2, 0.8]])


def test_soft_vote_weights_are_normalised():
    # 0.75 * A + 0.25 * B
    np.testing.assert_allclose(soft_vote([A, B], weights=[3, 1]), [[0.75, 0.25], [0.3, 0.7]])
    np.testing.assert_allclose(soft_vote([A, B], weights=[0, 2]), B)


def test_hard_vote_majority_shares():
    members = [np.array([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]),
               np.array([[0.5, 0.4, 0.1], [0.2, 0.7, 0.1]]),
               np.array([[0.2, 0.7, 0.1], [0.1, 0.6, 0.3]])]
    np.testing.assert_allclose(hard_vote(members), [[2 / 3, 1 / 3, 0], [0, 2 / 3, 1 / 3]])
    # a weight of 3 on the third member outvotes the other two
    np.testing.assert_allclose(hard_vote(members, weights=[1, 1, 3]),
                               [[0.4, 0.6, 0], [0, 0.8, 0.2]])


def test_hard_vote_tie_goes_to_the_soft_vote_favourite():
    m0 = np.array([[0.50, 0.40, 0.10], [0.45, 0.10, 0.45]])  # votes 0, then 0 (own tie: lower)
    m1 = np.array([[0.05, 0.90, 0.05], [0.10, 0.20, 0.70]])  # votes 1, then 2
    votes = hard_vote([m0, m1])
    # row 0: soft vote [0.275, 0.65, 0.075] favours class 1; row 1: [0.275, 0.15, 0.575] class 2
    assert votes.argmax(1).tolist() == [1, 2]
    np.testing.assert_allclose(votes, [[0.5, 0.5, 0], [0.5, 0, 0.5]], atol=1e-5)
    np.testing.assert_allclose(votes.sum(1), 1.0)
    # the tie-break follows the soft vote, not the member order
    assert hard_vote([m1, m0]).argmax(1).tolist() == [1, 2]
