"""Saved model files: a vote over members or one network's checkpoint, read and rebuilt."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from models import Vote, load, load_model, read
from trainables.checkpoint import Checkpoint
from trainables.config import TrainConfig
from trainables.models import initial_state


def _member(path, seed: int) -> Checkpoint:
    ckpt = Checkpoint(initial_state("resnet10t", 3, seed=seed),
                      dataclasses.asdict(TrainConfig()), ["a", "b", "c"], 16, [0.5] * 3,
                      [0.25] * 3)
    ckpt.save(path)
    return ckpt


def test_a_vote_stores_its_members_relative_to_itself(tmp_path):
    for s in (0, 1):
        _member(tmp_path / "exp" / "checkpoints" / f"t{s}" / "best.pt", s)
    members = [str(tmp_path / "exp" / "checkpoints" / f"t{s}" / "best.pt") for s in (0, 1)]
    Vote(members, [0.75, 0.25], tta=["hflip"]).save(tmp_path / "exp" / "ensemble" / "e.pt")
    shutil.move(tmp_path / "exp", tmp_path / "moved")  # the folder moves as a whole
    vote = read(tmp_path / "moved" / "ensemble" / "e.pt")
    assert isinstance(vote, Vote) and vote.weights == [0.75, 0.25] and vote.tta == ["hflip"]
    assert all(p.startswith(str(tmp_path / "moved")) for p in vote.members)
    model = load(tmp_path / "moved" / "ensemble" / "e.pt")
    images = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    probs = model.predict_proba(images)
    assert probs.shape == (4, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert model.class_names == ["a", "b", "c"] and model.image_size == 16


def test_a_checkpoint_is_read_as_one_network_and_rebuilt(tmp_path):
    saved = _member(tmp_path / "best.pt", 3)
    ckpt = read(tmp_path / "best.pt")
    assert isinstance(ckpt, Checkpoint) and ckpt.class_names == saved.class_names
    net, back = load_model(tmp_path / "best.pt", torch.device("cpu"))
    assert not net.training and back.arch == "resnet10t"
    for k, v in net.state_dict().items():
        assert torch.equal(v, saved.model[k]), k


def test_a_model_predicts_over_the_flips_its_training_made_harmless(tmp_path):
    """A bare training checkpoint (the refit a search ships) averages its plain and mirrored
    predictions where it trained with flips or the square's symmetries, and not otherwise."""
    from models.predict import predict_views

    images = np.random.default_rng(1).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    for hflip, dihedral in ((True, False), (False, True), (False, False)):
        path = tmp_path / f"{hflip}-{dihedral}.pt"
        Checkpoint(initial_state("resnet10t", 3, seed=0),
                   dataclasses.asdict(TrainConfig(hflip=hflip, dihedral=dihedral)),
                   ["a", "b", "c"], 16, [0.5] * 3, [0.25] * 3).save(path)
        net, ckpt = load_model(path, torch.device("cpu"))
        plain, flipped = (predict_views(net, x, mean=ckpt.mean, std=ckpt.std, tta=[])
                          for x in (images, mirrored))
        assert not np.allclose(plain, flipped, atol=1e-4)  # the view changes this network's answer
        expected = (plain + flipped) / 2 if hflip or dihedral else plain
        assert read(path).tta == ["auto"]
        assert np.allclose(load(path).predict_proba(images), expected, atol=1e-5)


def test_tta_options_are_auto_none_or_known_views():
    from models.predict import check_tta
    from trainables.errors import UserError

    assert check_tta(["auto"]) == ["auto"] and check_tta(["none"]) == []
    assert check_tta(["hflip", "shift"]) == ["hflip", "shift"]
    for bad in (["auto", "hflip"], ["rotate"], []):
        with pytest.raises(UserError, match="pass auto"):
            check_tta(bad)
