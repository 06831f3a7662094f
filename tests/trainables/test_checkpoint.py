"""The checkpoint format: one typed view, plain dicts on disk, soups and older files read."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from trainables.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trainables.config import TrainConfig


def _ckpt(**kw) -> Checkpoint:
    return Checkpoint({"w": torch.arange(3.0)}, dataclasses.asdict(TrainConfig(lr=0.01)),
                      ["cat", "dog"], 16, [0.5] * 3, [0.25] * 3, epoch=4,
                      metrics={"val_acc": 0.75}, init_id="abc", split_hash="s1",
                      val_indices=np.array([3, 1]), val_probs=np.array([[0.9, 0.1], [0.2, 0.8]]),
                      **kw)


def test_a_checkpoint_round_trips_through_a_plain_dict(tmp_path):
    ckpt = _ckpt()
    ckpt.save(tmp_path / "c.pt")
    raw = load_checkpoint(tmp_path / "c.pt")  # weights_only: plain types and tensors
    assert type(raw) is dict and raw["format"] == 1 and "kind" not in raw
    back = Checkpoint.load(tmp_path / "c.pt")
    assert back.train_config == TrainConfig(lr=0.01) and back.arch == "resnet10t"
    assert back.class_names == ["cat", "dog"] and back.epoch == 4 and back.val_acc == 0.75
    assert np.array_equal(back.val_indices, [3, 1]) and back.val_probs.dtype == np.float32
    assert torch.equal(back.model["w"], ckpt.model["w"]) and back.soup is None


def test_a_soup_is_a_checkpoint_that_says_how_it_was_made(tmp_path):
    soup = dataclasses.replace(_ckpt().slim(), tta=["hflip"],
                               soup={"combiner": "greedy soup", "bn_recalibrated": True,
                                     "ingredients": ["a/best.pt", "b/best.pt"]})
    soup.save(tmp_path / "soup.pt")
    raw = load_checkpoint(tmp_path / "soup.pt")
    assert raw["kind"] == "soup" and "val_probs" not in raw and raw["tta"] == ["hflip"]
    back = Checkpoint.load(tmp_path / "soup.pt")
    assert back.soup == soup.soup and back.tta == ["hflip"] and back.val_probs is None


def test_a_checkpoint_written_as_a_dict_by_an_earlier_version_still_loads(tmp_path):
    save_checkpoint({"format": 1, "model": {"w": torch.ones(1)}, "config": {"lr": 0.1},
                     "class_names": ["a", "b"], "image_size": 8, "mean": [0, 0, 0],
                     "std": [1, 1, 1], "epoch": 2, "metrics": {"val_acc": 0.5, "epoch": 2},
                     "init_id": "x", "split_hash": "y",
                     "val_indices": torch.tensor([0]), "val_probs": torch.tensor([[0.5, 0.5]])},
                    tmp_path / "old.pt")
    back = Checkpoint.load(tmp_path / "old.pt")
    assert back.train_config.lr == 0.1 and back.train_config.plugins == ()
    assert back.epoch == 2 and back.val_probs.shape == (1, 2)


def test_save_checkpoint_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"a": torch.ones(2)}, path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint({"a": lambda: 1}, path)  # cannot be pickled: fails mid-write
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
