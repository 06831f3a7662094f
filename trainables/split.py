"""One stratified train/val/test split per experiment, drawn from the seed and saved with it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from trainables.errors import UserError


@dataclass(frozen=True)
class Split:
    """Index arrays into an `ImageData`; `test` is only ever used for reporting."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def hash(self) -> str:
        """Short content hash: equal hashes mean every trial and member saw the same split."""
        h = hashlib.sha256()
        for part in (self.train, self.val, self.test):
            h.update(np.asarray(part, np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()[:12]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def to_doc(self, ids: list[str] | None = None) -> dict:
        """The split as plain JSON data: indices per part, its hash, optionally the image ids."""
        parts = ("train", "val", "test")
        doc = {"hash": self.hash, **{k: getattr(self, k).tolist() for k in parts}}
        if ids is not None:
            doc["ids"] = {k: [ids[i] for i in getattr(self, k)] for k in parts}
        return doc

    @classmethod
    def from_doc(cls, doc: dict, source: str = "the split file") -> Split:
        """Reads `to_doc`'s output back; a UserError when the indices no longer match the hash."""
        split = cls(*(np.asarray(doc[k], np.int64) for k in ("train", "val", "test")))
        if split.hash != doc["hash"]:
            raise UserError(f"split file {source} does not match its recorded hash; it was "
                            "edited or is corrupt: restore it or start a new experiment")
        return split


def draw_split(labels: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int,
               predefined: dict[str, np.ndarray] | None = None,
               class_names: list[str] | None = None, groups: np.ndarray | None = None) -> Split:
    """Stratified split; parts the data already defines (`predefined`) are kept as they are.

    Parts missing from `predefined` are drawn from its train part, stratified by class, as shares
    of that train part (of all images when the data defines no split). A test folder as large as
    the train folder then does not cost the training set more than `val_fraction` of itself.
    With `groups`, the images of one group land in one part together (copies of a file, or a
    CSV's group column such as a patient id): they are split as groups, stratified by the class
    of each group's first image.
    """
    predefined = predefined or {}
    pool = predefined.get("train", np.arange(len(labels)))
    base = len(pool)
    parts = {"test": test_fraction, "val": val_fraction}  # shares of the train pool
    drawn = {}
    for name, fraction in parts.items():
        if name in predefined:
            drawn[name] = np.sort(predefined[name])
            continue
        _check_class_counts(labels[pool], class_names, need=3 if len(drawn) == 0 else 2)
        share = min(fraction * base / len(pool), 0.5)
        try:
            pool, part = _draw(pool, labels, groups, share, seed)
        except ValueError as exc:
            raise UserError(f"cannot draw a stratified {name} split of {fraction:.0%} from "
                            f"{len(pool)} images: {exc}; add images or change "
                            f"--{name}-fraction") from None
        drawn[name] = np.sort(part)
    return Split(train=np.sort(pool), val=drawn["val"], test=drawn["test"])


def _draw(pool: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, share: float,
          seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, part) of `pool`, stratified; with groups, whole groups move to the part."""
    from sklearn.model_selection import train_test_split

    if groups is None:
        return train_test_split(pool, test_size=share, random_state=seed, stratify=labels[pool])
    keys, first, inverse = np.unique(groups[pool], return_index=True, return_inverse=True)
    strata = labels[pool][first]
    if np.unique(strata, return_counts=True)[1].min() < 2:
        strata = None  # a class with one group cannot be stratified: draw groups plainly
    _, chosen = train_test_split(np.arange(len(keys)), test_size=share, random_state=seed,
                                 stratify=strata)
    in_part = np.isin(inverse, chosen)
    return pool[~in_part], pool[in_part]


def _check_class_counts(labels: np.ndarray, class_names: list[str] | None, need: int) -> None:
    counts = np.bincount(labels)
    few = [i for i, n in enumerate(counts) if 0 < n < need]
    if few:
        i = few[0]
        name = class_names[i] if class_names else str(i)
        raise UserError(f"class {name!r} has {counts[i]} image(s), too few to split into train, "
                        f"val and test (needs at least {need}); add images of it or remove it")
