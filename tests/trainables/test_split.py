"""The stratified split: proportions, determinism, hashing, saving, predefined parts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainables.errors import UserError
from trainables.files import read_json, write_json
from trainables.split import Split, draw_split

# 3 imbalanced classes: 150 / 100 / 50
LABELS = np.repeat(np.arange(3), [150, 100, 50]).astype(np.int64)
np.random.default_rng(0).shuffle(LABELS)


def _draw(seed: int = 0, labels: np.ndarray = LABELS, **kw) -> Split:
    kw = {"val_fraction": 0.2, "test_fraction": 0.1, **kw}
    return draw_split(labels, seed=seed, **kw)


def test_parts_are_disjoint_and_cover_everything():
    s = _draw()
    parts = [s.train, s.val, s.test]
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    assert sorted(joined.tolist()) == list(range(len(LABELS)))
    assert not set(s.train) & set(s.val)
    assert not set(s.train) & set(s.test)
    assert not set(s.val) & set(s.test)
    for part in parts:
        assert part.dtype.kind == "i"
        assert np.array_equal(part, np.sort(part))


def test_sizes_follow_fractions_of_the_whole_data_set():
    s = _draw(val_fraction=0.2, test_fraction=0.1)
    n = len(LABELS)
    assert abs(len(s.val) - 0.2 * n) <= 2
    assert abs(len(s.test) - 0.1 * n) <= 2
    assert s.sizes() == {"train": len(s.train), "val": len(s.val), "test": len(s.test)}
    assert sum(s.sizes().values()) == n


def test_stratified():
    s = _draw(val_fraction=0.2, test_fraction=0.2)
    overall = np.bincount(LABELS) / len(LABELS)
    for part in (s.train, s.val, s.test):
        share = np.bincount(LABELS[part], minlength=3) / len(part)
        assert np.abs(share - overall).max() < 0.03, share


def test_deterministic_for_a_seed_and_different_for_another():
    a, b, c = _draw(seed=7), _draw(seed=7), _draw(seed=8)
    for k in ("train", "val", "test"):
        assert np.array_equal(getattr(a, k), getattr(b, k))
    assert a.hash == b.hash
    assert not np.array_equal(a.val, c.val)
    assert a.hash != c.hash


def test_hash_changes_when_the_split_changes():
    s = _draw()
    moved = Split(train=s.train[1:], val=np.sort(np.append(s.val, s.train[0])), test=s.test)
    assert moved.hash != s.hash
    # the boundary between parts counts, not only the set of indices
    shifted = Split(train=s.train, val=s.val[:-1], test=np.sort(np.append(s.test, s.val[-1])))
    assert shifted.hash != s.hash
    assert len(s.hash) == 12 and int(s.hash, 16) >= 0


def test_save_and_load_round_trip(tmp_path):
    s = _draw()
    ids = [f"img_{i}.png" for i in range(len(LABELS))]
    path = tmp_path / "split.json"
    write_json(path, s.to_doc(ids))
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]
    doc = json.loads(path.read_text())
    assert doc["hash"] == s.hash
    assert doc["ids"]["val"] == [ids[i] for i in s.val]
    back = Split.from_doc(read_json(path), str(path))
    for k in ("train", "val", "test"):
        assert np.array_equal(getattr(back, k), getattr(s, k))
    assert back.hash == s.hash


def test_tampered_split_file_raises(tmp_path):
    s = _draw()
    path = tmp_path / "split.json"
    write_json(path, s.to_doc())
    doc = json.loads(path.read_text())
    doc["val"].append(doc["train"].pop())  # move one image, keep the old hash
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError) as info:
        Split.from_doc(read_json(path), str(path))
    assert str(path) in str(info.value)


def test_predefined_val_is_kept_and_test_drawn_from_train():
    n = len(LABELS)
    rng = np.random.default_rng(1)
    val = np.sort(rng.choice(n, 40, replace=False))
    train = np.setdiff1d(np.arange(n), val)
    s = _draw(predefined={"train": train, "val": val}, test_fraction=0.1)
    assert np.array_equal(s.val, val)
    assert set(s.test) <= set(train)
    assert set(s.train) | set(s.test) == set(train)
    assert not set(s.train) & set(s.test)
    assert abs(len(s.test) - 0.1 * len(train)) <= 2  # a share of the train part


def test_val_from_a_train_folder_is_a_share_of_train_not_of_all_images():
    """A test folder as large as the train folder must not cost train 30 % of its images."""
    labels = np.tile(np.arange(4), 500)  # 2,000 images: 1,000 train + 1,000 test
    pre = {"train": np.arange(1000), "test": np.arange(1000, 2000)}
    s = draw_split(labels, val_fraction=0.15, test_fraction=0.15, seed=0, predefined=pre)
    assert len(s.val) == 150 and len(s.train) == 850
    assert np.array_equal(s.test, pre["test"])


def test_all_predefined_parts_are_kept():
    n = len(LABELS)
    idx = np.random.default_rng(2).permutation(n)
    pre = {"train": np.sort(idx[:200]), "val": np.sort(idx[200:250]),
           "test": np.sort(idx[250:])}
    s = _draw(predefined=pre)
    for k in ("train", "val", "test"):
        assert np.array_equal(getattr(s, k), pre[k])


def test_predefined_train_only_draws_both_from_it():
    n = len(LABELS)
    pre = {"train": np.arange(n)}
    s = _draw(predefined=pre)
    plain = _draw()
    for k in ("train", "val", "test"):
        assert np.array_equal(getattr(s, k), getattr(plain, k))


def test_class_with_too_few_images_is_named():
    labels = np.array([0] * 20 + [1] * 20 + [2] * 2)
    with pytest.raises(UserError) as info:
        draw_split(labels, val_fraction=0.2, test_fraction=0.2, seed=0,
                   class_names=["cat", "dog", "rare_bird"])
    assert "rare_bird" in str(info.value)
    assert "2 image" in str(info.value)


def test_class_with_too_few_images_without_names_uses_index():
    labels = np.array([0] * 20 + [1] * 1 + [2] * 20)
    with pytest.raises(UserError, match="'1'"):
        draw_split(labels, val_fraction=0.2, test_fraction=0.2, seed=0)


def test_too_small_to_stratify_is_a_user_error():
    # 3 images per class pass the count check, but 10 classes cannot fit a 1-image test part
    labels = np.repeat(np.arange(10), 3)
    with pytest.raises(UserError, match="test"):
        draw_split(labels, val_fraction=0.02, test_fraction=0.02, seed=0)
