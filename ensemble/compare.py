"""Builds every combiner from member predictions and scores it on val and test.

Every choice (vote weights, soup ingredients, raw or BN-recalibrated soup, the final pick) is made
on val; test is only read to report the rows.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ensemble.combine import ensemble_metrics, fit_vote_weights, hard_vote, soft_vote
from ensemble.members import Member, SearchState
from ensemble.predict import timed_predict
from ensemble.soup import greedy_soup, has_batchnorm, recalibrate_bn, uniform_soup
from trainables.checkpoint import load_checkpoint
from trainables.train import TrainConfig, load_trained

log = logging.getLogger("ensemble")
BN_IMAGES = 2048  # training images used to recompute BatchNorm statistics of a soup


@dataclass
class MemberPreds:
    member: Member
    val: np.ndarray
    test: np.ndarray
    ms_per_image: float
    params: int
    arch: str


@dataclass
class Row:
    """One combiner: its members, weights, val and test metrics, inference cost."""

    name: str
    members: list[str]
    weights: list[float]
    val: dict[str, float]
    test: dict[str, float]
    params: int
    ms_per_image: float
    test_probs: np.ndarray = field(repr=False, default=None)
    artifact: dict[str, Any] | None = field(repr=False, default=None)
    note: str = ""

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "members": self.members, "weights": self.weights,
                "val": self.val, "test": self.test, "params_x_members": self.params,
                "ms_per_image": round(self.ms_per_image, 4), "note": self.note}


def predict_members(state: SearchState, members: list[Member], tta: list[str]
                    ) -> list[MemberPreds]:
    """Val and test probabilities of every member, each computed once."""
    out = []
    val_x = state.data.images[state.split.val]
    test_x = state.data.images[state.split.test]
    for m in members:
        model, ckpt = load_trained(m.checkpoint, torch.device("cpu"))
        val, _ = timed_predict(model, val_x, ckpt, tta)
        test, ms = timed_predict(model, test_x, ckpt, tta)
        out.append(MemberPreds(m, val, test, ms, sum(p.numel() for p in model.parameters()),
                               TrainConfig.from_dict(ckpt["config"]).model))
    return out


def vote_rows(preds: list[MemberPreds], y_val: np.ndarray, y_test: np.ndarray,
              rounds: int) -> list[Row]:
    """Best single member, hard vote, uniform soft vote, weighted soft vote (Caruana on val)."""
    names = [p.member.name for p in preds]
    val = np.stack([p.val for p in preds])
    test = np.stack([p.test for p in preds])
    cost = sum(p.ms_per_image for p in preds)
    params = sum(p.params for p in preds)
    scores = [ensemble_metrics(p.val, y_val) for p in preds]
    best = min(range(len(preds)), key=lambda i: (-scores[i]["accuracy"], scores[i]["loss"]))
    rows = [_row("best single", [names[best]], [1.0], preds[best].val, preds[best].test,
                 y_val, y_test, preds[best].params, preds[best].ms_per_image)]
    uniform = [1.0 / len(preds)] * len(preds)
    rows.append(_row("hard vote", names, uniform, hard_vote(val), hard_vote(test), y_val,
                     y_test, params, cost))
    rows.append(_row("soft vote", names, uniform, soft_vote(val), soft_vote(test), y_val,
                     y_test, params, cost))
    w = fit_vote_weights(val, y_val, rounds=rounds)
    used = w > 0
    rows.append(_row("weighted vote", [n for n, u in zip(names, used) if u],
                     [float(x) for x in w[used]], soft_vote(val, w), soft_vote(test, w), y_val,
                     y_test, sum(p.params for p, u in zip(preds, used) if u),
                     sum(p.ms_per_image for p, u in zip(preds, used) if u)))
    rows[0].artifact = {"kind": "vote", "members": [preds[best].member.checkpoint],
                        "weights": [1.0]}
    rows[1].artifact = {"kind": "vote", "hard": True, "weights": uniform,
                        "members": [p.member.checkpoint for p in preds]}
    rows[2].artifact = {"kind": "vote", "weights": uniform,
                        "members": [p.member.checkpoint for p in preds]}
    rows[3].artifact = {"kind": "vote", "weights": [float(x) for x in w[used]],
                        "members": [p.member.checkpoint for p, u in zip(preds, used) if u]}
    return rows


def soup_rows(state: SearchState, preds: list[MemberPreds], tta: list[str]) -> list[Row]:
    """Uniform and greedy soups over the members that share the best member's architecture."""
    y_val = state.data.labels[state.split.val]
    y_test = state.data.labels[state.split.test]
    order = sorted(range(len(preds)), key=lambda i: (-_acc(preds[i].val, y_val),
                                                     ensemble_metrics(preds[i].val, y_val)["loss"]))
    group = [i for i in order if preds[i].arch == preds[order[0]].arch]
    if len(group) < 2:
        return [_skipped(name, "fewer than 2 members share an architecture")
                for name in ("uniform soup", "greedy soup")]
    base_model, base = load_trained(preds[group[0]].member.checkpoint, torch.device("cpu"))
    states = [load_checkpoint(preds[i].member.checkpoint)["model"] for i in group]
    cooker = _SoupCooker(state, base_model, base, tta)
    rows = []
    for name, (soup, chosen) in (
            ("uniform soup", (uniform_soup(states), list(range(len(group))))),
            ("greedy soup", greedy_soup(states, cooker.val_accuracy,
                                        order=list(range(len(group)))))):
        model, recal = cooker.best_variant(soup)
        val, _ = timed_predict(model, state.data.images[state.split.val], base, tta)
        test, ms = timed_predict(model, state.data.images[state.split.test], base, tta)
        picked = [preds[group[i]].member for i in chosen]
        row = _row(name, [m.name for m in picked], [1.0 / len(picked)] * len(picked), val, test,
                   y_val, y_test, preds[group[0]].params, ms)
        row.note = "BN statistics recomputed" if recal else "BN statistics averaged"
        row.artifact = {"kind": "soup", "state": {k: v.clone() for k, v in
                                                  model.state_dict().items()},
                        "base": base, "ingredients": [m.checkpoint for m in picked],
                        "bn_recalibrated": recal}
        rows.append(row)
    return rows


class _SoupCooker:
    """Evaluates a soup state both raw and with BatchNorm statistics recomputed on train images."""

    def __init__(self, state: SearchState, model: torch.nn.Module, base: dict,
                 tta: list[str]) -> None:
        self.state, self.model, self.base, self.tta = state, model, base, tta
        idx = state.split.train
        if len(idx) > BN_IMAGES:
            idx = np.random.default_rng(0).choice(idx, BN_IMAGES, replace=False)
        self.bn_images = state.data.images[np.sort(idx)]
        self.y_val = state.data.labels[state.split.val]

    def _score(self, model: torch.nn.Module) -> tuple[float, float]:
        probs, _ = timed_predict(model, self.state.data.images[self.state.split.val], self.base,
                                 self.tta)
        m = ensemble_metrics(probs, self.y_val)
        return m["accuracy"], -m["loss"]

    def best_variant(self, soup: dict) -> tuple[torch.nn.Module, bool]:
        raw = copy.deepcopy(self.model)
        raw.load_state_dict(soup)
        if not has_batchnorm(raw):
            return raw.eval(), False
        recal = recalibrate_bn(copy.deepcopy(raw), self.bn_images, mean=self.base["mean"],
                               std=self.base["std"])
        if self._score(recal) > self._score(raw):
            return recal, True
        return raw.eval(), False

    def val_accuracy(self, soup: dict) -> float:
        model, _ = self.best_variant(soup)
        return self._score(model)[0]


def choose(rows: list[Row]) -> Row:
    """The row to save, chosen on val only: accuracy, then NLL, then fewer parameters."""
    usable = [r for r in rows if r.artifact is not None]
    return min(usable, key=lambda r: (-r.val["accuracy"], r.val["loss"], r.params))


def _row(name: str, members: list[str], weights: list[float], val: np.ndarray, test: np.ndarray,
         y_val: np.ndarray, y_test: np.ndarray, params: int, ms: float) -> Row:
    return Row(name, members, weights, ensemble_metrics(val, y_val),
               ensemble_metrics(test, y_test), params, ms, test_probs=test)


def _skipped(name: str, why: str) -> Row:
    nan = {k: float("nan") for k in ("accuracy", "f1", "loss", "ece")}
    return Row(name, [], [], dict(nan), dict(nan), 0, float("nan"), note=f"skipped: {why}")


def _acc(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())
