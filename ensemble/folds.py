"""Cross-validation ensembles: the top configurations retrained on K folds of train + val.

Every choice made on one val split of a few hundred images is noisy. K folds give every train +
val image one out-of-fold (OOF) prediction, from the one model of a configuration that did not
train on it: the CV score (mean and spread over folds) ranks configurations, and vote weights are
fit on all OOF predictions instead of on val alone. Test never enters a fold: it is only reported.

How fold models start: like every trial, from the search's shared start (init.pt, or the
architecture's own init-<model>.pt), with the trial's configuration and seed, trained on the
other folds; the best epoch is picked on the held-out fold, as a trial's is on val. Fold models
of one start can therefore be averaged like the trials. Soups of fold models are not built: a
soup has no out-of-fold predictions to be chosen on, and every val image trained one of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ensemble.combine import ensemble_metrics
from ensemble.members import Member, SearchState
from models.artifact import load_model
from models.predict import predict, predictions_frame, timed_predict
from trainables.checkpoint import Checkpoint
from trainables.errors import UserError
from trainables.files import atomic_write, write_json

log = logging.getLogger("ensemble")


@dataclass(frozen=True)
class FoldPlan:
    """K folds of the train + val images (`pool`, sorted data indices); `fold_of[i]` is the
    fold whose model does not train on `pool[i]`."""

    k: int
    seed: int
    pool: np.ndarray
    fold_of: np.ndarray
    group_col: str | None = None
    grouped: bool = False

    @property
    def key(self) -> str:
        """Names this assignment (folder folds/<key>/): other K, seed or groups, other models."""
        h = hashlib.sha256(np.asarray(self.pool, np.int64).tobytes())
        h.update(np.asarray(self.fold_of, np.int64).tobytes())
        return f"k{self.k}-{h.hexdigest()[:8]}"

    def held_out(self, fold: int) -> np.ndarray:
        """Data indices of the images fold `fold`'s model does not train on."""
        return self.pool[self.fold_of == fold]

    def training(self, fold: int) -> np.ndarray:
        return self.pool[self.fold_of != fold]


def plan_folds(state: SearchState, k: int, group_col: str | None = None) -> FoldPlan:
    """The K folds of a search's train + val images, drawn from its seed; UserErrors for folds
    that cannot hold every class. Groups: `group_col` (else the search's own) and identical
    images always share a fold."""
    pool = np.sort(np.concatenate([state.split.train, state.split.val]))
    groups = fold_groups(state, group_col)
    col = group_col or state.config.group_col
    fold_of = draw_folds(state.data.labels, pool, k, seed=state.seed, groups=groups,
                         class_names=state.data.class_names, group_col=col)
    return FoldPlan(k, state.seed, pool, fold_of, col, groups is not None)


def draw_folds(labels: np.ndarray, pool: np.ndarray, k: int, *, seed: int,
               groups: np.ndarray | None = None, class_names: list[str] | None = None,
               group_col: str | None = None) -> np.ndarray:
    """The fold (0..k-1) of each image of `pool`: scikit-learn's StratifiedKFold, or
    StratifiedGroupKFold with `groups` (a group never straddles a fold's training and held-out
    parts). Every fold's held-out part must hold every class, or its score means little."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    names = class_names or [str(c) for c in range(int(labels.max()) + 1)]
    y = labels[pool]
    counts = np.bincount(y, minlength=len(names))
    present = np.flatnonzero(counts)
    small = int(present[np.argmin(counts[present])])
    if k < 2:
        raise UserError(f"--folds must be at least 2 (each fold's model is judged on the images "
                        f"it did not train on), not {k}; use --folds 5, or leave it out")
    if k > counts[small]:
        raise UserError(f"--folds {k} is more than class {names[small]!r} has images in train + "
                        f"val ({counts[small]}), so some fold would hold none of it; use "
                        f"--folds {counts[small]} or fewer")
    if groups is None:
        parts = StratifiedKFold(k, shuffle=True, random_state=seed).split(pool, y)
    else:
        g = groups[pool]
        if len(np.unique(g)) < k:
            raise UserError(f"train + val hold only {len(np.unique(g))} groups ("
                            f"{_grouping(group_col)}), fewer than --folds {k}; use fewer folds")
        parts = StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(pool, y, g)
    fold_of = np.full(len(pool), -1)
    for fold, (_, held) in enumerate(parts):
        fold_of[held] = fold
    assert (fold_of >= 0).all(), "a K-fold splitter left an image out of every fold"
    for fold in range(k):
        missing = np.setdiff1d(present, y[fold_of == fold])
        if len(missing):
            raise UserError(f"fold {fold + 1} of {k} holds no image of class "
                            f"{names[int(missing[0])]!r}: {_grouping(group_col)} keep too many "
                            "of its images together; use fewer --folds or another --group-col")
    return fold_of


def _grouping(group_col: str | None) -> str:
    return (f"the groups of --group-col {group_col!r} and identical images" if group_col
            else "identical images, which always share a fold,")


def fold_groups(state: SearchState, group_col: str | None = None) -> np.ndarray | None:
    """A group per image, or None when every image is its own group: a CSV's group column
    (`group_col`, else the search's --group-col) joined with exact copies by pixel content,
    since a copy in another fold would give the held-out answer away."""
    images = state.data.images
    keys = [[hashlib.blake2b(im.tobytes(), digest_size=16).hexdigest()] for im in images]
    col = group_col or state.config.group_col
    if col:
        keys = [k + [f"group:{g}" for g in named] for k, named in
                zip(keys, _csv_groups(state, col))]
    groups = _connected(keys)
    return None if len(np.unique(groups)) == len(groups) else groups


def _csv_groups(state: SearchState, col: str) -> list[set[str]]:
    """The named groups of each image, read again from the search's CSV (decoded data does not
    keep them)."""
    source = state.config.data
    path = data_source(state)
    if source and path is None:
        raise UserError(f"the search's data {source} is not found from {Path.cwd()} nor beside "
                        f"its storage; run from the folder the search ran in")
    if path is None or path.suffix.lower() != ".csv":
        raise UserError(f"--group-col {col!r} needs a search on a CSV, but {state.experiment!r} "
                        f"was searched on {source or 'the built-in digits'}; leave --group-col "
                        "out")
    table = pd.read_csv(path)
    if col not in table.columns:
        raise UserError(f"CSV {path} has no group column {col!r} (it has "
                        f"{', '.join(map(repr, table.columns))}); pass an existing --group-col")
    image_col = state.config.image_col
    by_id: dict[str, set[str]] = {}
    for p, g in zip(table[image_col], table[col].astype(str)):  # as the search read them
        if isinstance(p, str):
            by_id.setdefault(_image_id(path.parent, p), set()).add(g)
    return [by_id.get(i, set()) for i in state.data.ids]


def data_source(state: SearchState) -> Path | None:
    """The search's --data (a folder or CSV) as found from here or from the folder the search
    ran in (the one holding its storage); None for the built-in digits or when it is gone."""
    source = state.config.data
    if not source:
        return None
    given = Path(source).expanduser()
    tried = [given] if given.is_absolute() else [Path.cwd() / given,
                                                 state.store.dir.parent.parent / given]
    return next((p for p in tried if p.exists()), None)


def _image_id(root: Path, rel: str) -> str:
    """An image's id as trainables.data gives it: its path relative to the CSV's folder."""
    path = root / rel
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _connected(keys: list[list[str]]) -> np.ndarray:
    """Group ids: images sharing any key are in one group (connected components)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    vocab: dict[str, int] = {}
    rows = [i for i, ks in enumerate(keys) for _ in ks]
    cols = [len(keys) + vocab.setdefault(k, len(vocab)) for ks in keys for k in ks]
    n = len(keys) + len(vocab)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1][:len(keys)].astype(np.int64)


# ---------------------------------------------------------------------- training and predicting


def fit_folds(state: SearchState, plan: FoldPlan, members: list[Member], tta: list[str], *,
              address: str | None = None, num_cpus: int | None = None) -> FoldPool:
    """Trains (or reuses) the fold models of the members' configurations, then predicts."""
    paths = train_fold_models(state, plan, members, address=address, num_cpus=num_cpus)
    return predict_folds(state, plan, members, paths, tta)


def train_fold_models(state: SearchState, plan: FoldPlan, members: list[Member], *,
                      address: str | None = None, num_cpus: int | None = None
                      ) -> list[list[Path]]:
    """One model per (member's configuration, fold), through the training service like the
    seed retrains; a fold model already finished (same configuration) is reused, an
    interrupted one continues from its last epoch. Returns paths [member][fold]."""
    from trainables.cli import start_ray
    from trainables.jobs import TrainJob, train
    from trainables.store import finished

    paths, jobs, starts = [], [], {}
    for m in members:
        cfg = dataclasses.replace(  # the trial's settings; its last epochs are not kept
            Checkpoint.load(m.checkpoint).train_config, keep_last=0)
        if cfg.model not in starts:  # fold models start from the search's shared start
            starts[cfg.model] = state.store.read_init(cfg.model)
        row = [state.store.fold_checkpoint(plan.key, m.trial_id, f) for f in range(plan.k)]
        jobs += [TrainJob(cfg, starts[cfg.model].inputs(
            state.data, plan.training(f), plan.held_out(f), split_hash=state.split.hash), p,
            name=f"{m.trial_id}-fold{f}") for f, p in enumerate(row)]
        paths.append(row)
    done = sum(finished(j.checkpoint, j.config) for j in jobs)
    log.info("folds: %d configuration(s) x %d folds; %d of %d fold model(s) already trained, "
             "reused", len(members), plan.k, done, len(jobs))
    if done < len(jobs):
        import ray

        owns = start_ray(address, num_cpus)
        try:
            train(jobs, ray_dir=state.store.ray_dir)
        finally:
            if owns:
                ray.shutdown()
    return paths


@dataclass
class ConfigFolds:
    """One configuration's K fold models and what they predict."""

    member: Member  # the trial whose configuration they retrain
    checkpoints: list[str]
    oof: np.ndarray  # (len(pool), C): each train + val image by the model that did not train on it
    test: np.ndarray  # (n_test, C): the mean of the K models
    fold_scores: list[dict[str, float]]
    ms_per_image: float  # all K models
    params: int  # one model


@dataclass
class FoldPool:
    """What the fold combiners fit on: every configuration's OOF and test predictions."""

    plan: FoldPlan
    configs: list[ConfigFolds]
    labels: np.ndarray  # of plan.pool


def predict_folds(state: SearchState, plan: FoldPlan, members: list[Member],
                  paths: list[list[Path]], tta: list[str]) -> FoldPool:
    """Each fold model predicts its held-out images (together: the OOF predictions, every
    train + val image once) and the test images; each configuration's OOF file is written."""
    images, test = state.data.images, state.split.test
    configs = []
    for m, row in zip(members, paths):
        oof = np.zeros((len(plan.pool), state.data.num_classes))
        tests, scores, ms, params = [], [], 0.0, 0
        for fold, path in enumerate(row):
            model, ckpt = load_model(path, torch.device("cpu"))
            held = plan.fold_of == fold
            oof[held] = predict(model, images[plan.pool[held]], ckpt, tta)
            scores.append(ensemble_metrics(oof[held], state.data.labels[plan.pool[held]]))
            probs, cost = timed_predict(model, images[test], ckpt, tta)
            tests.append(probs)
            ms += cost
            params = sum(p.numel() for p in model.parameters())
        configs.append(ConfigFolds(m, [str(p) for p in row], oof, np.mean(tests, axis=0),
                                   scores, ms, params))
        _write_oof(state, plan, configs[-1])
    return FoldPool(plan, configs, state.data.labels[plan.pool])


def _write_oof(state: SearchState, plan: FoldPlan, c: ConfigFolds) -> None:
    frame = predictions_frame([state.data.ids[i] for i in plan.pool], c.oof,
                              state.data.class_names, state.data.labels[plan.pool])
    frame.insert(1, "index", plan.pool)
    frame.insert(2, "fold", plan.fold_of)
    path = state.store.folds_dir(plan.key) / str(c.member.trial_id) / "oof.csv"
    atomic_write(path, frame.to_csv(index=False))


def fold_report(state: SearchState, folds: FoldPool, metric: str = "accuracy") -> dict:
    """The folds and each configuration's CV score (mean ± std over folds), for report.json;
    also written to folds/<key>/folds.json with the assignment itself."""
    plan = folds.plan
    cv = []
    for c in folds.configs:
        per_fold = [s[metric] for s in c.fold_scores]
        cv.append({"config": c.member.name, "trial_id": c.member.trial_id,
                   "holdout_val": c.member.val_acc, "cv_mean": float(np.mean(per_fold)),
                   "cv_std": float(np.std(per_fold, ddof=1)), "per_fold": per_fold,
                   "oof": ensemble_metrics(c.oof, folds.labels)})
    doc = {"k": plan.k, "key": plan.key, "seed": plan.seed, "group_col": plan.group_col,
           "grouped": plan.grouped, "images": len(plan.pool), "metric": metric}
    write_json(state.store.folds_dir(plan.key) / "folds.json",
               {**doc, "split_hash": state.split.hash, "test": state.split.test.tolist(),
                "pool": plan.pool.tolist(), "fold_of": plan.fold_of.tolist(), "cv": cv})
    return {"folds": doc, "cv": cv}
