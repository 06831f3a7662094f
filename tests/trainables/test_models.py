"""timm model factory: name checks, local pretrained weights, the shared initial state."""

from __future__ import annotations

import pytest
import torch

from trainables.errors import UserError
from trainables.models import check_model_name, create_model, initial_state, normalization


def test_known_model_name_passes_and_builds():
    check_model_name("resnet10t")  # raises for a name timm does not know
    assert create_model("resnet10t", 3).num_classes == 3


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError) as info:
        check_model_name("resnet10tt")
    msg = str(info.value)
    assert "'resnet10tt'" in msg
    assert "did you mean" in msg and "resnet10t" in msg


def test_unknown_model_without_close_names():
    with pytest.raises(UserError) as info:
        create_model("zzzz_not_a_model_qqqq", 3)
    assert "zzzz_not_a_model_qqqq" in str(info.value)
    assert "did you mean" not in str(info.value)


def test_create_model_has_the_requested_head():
    model = create_model("resnet10t", 7, drop_rate=0.2)
    assert model.num_classes == 7
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_missing_pretrained_file(tmp_path):
    missing = tmp_path / "weights.pth"
    with pytest.raises(UserError) as info:
        create_model("resnet10t", 3, pretrained_file=str(missing))
    assert str(missing) in str(info.value)


def test_weights_of_another_architecture_are_a_user_error(tmp_path):
    other = tmp_path / "resnet18.pth"
    torch.save(create_model("resnet18", 3).state_dict(), other)
    with pytest.raises(UserError) as info:
        create_model("resnet10t", 3, pretrained_file=str(other))
    assert "resnet10t" in str(info.value) and str(other) in str(info.value)


def test_weights_file_matching_no_key_is_a_user_error(tmp_path):
    torch.manual_seed(0)
    source = create_model("resnet10t", 5)
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"weights": source.state_dict(), "epoch": 3}, wrapped)
    with pytest.raises(UserError, match="matches only 0 of") as info:
        create_model("resnet10t", 3, pretrained_file=str(wrapped))
    assert str(wrapped) in str(info.value) and "state dict" in str(info.value)


def test_local_weights_file_loads_with_another_head(tmp_path):
    torch.manual_seed(123)
    source = create_model("resnet10t", 5)
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)

    torch.manual_seed(999)  # a different random init, so equality means the file was loaded
    model = create_model("resnet10t", 3, pretrained_file=str(path))
    assert model.num_classes == 3
    got, want = model.state_dict(), source.state_dict()
    body = [k for k in want if not k.startswith("fc.")]
    assert body
    for k in body:
        assert torch.equal(got[k], want[k]), k
    assert got["fc.weight"].shape == (3, want["fc.weight"].shape[1])

    fresh = create_model("resnet10t", 3)
    assert not torch.equal(fresh.state_dict()["conv1.0.weight"], want["conv1.0.weight"])


def test_initial_state_same_seed_identical_other_seed_different():
    a = initial_state("resnet10t", 4, seed=1)
    b = initial_state("resnet10t", 4, seed=1)
    c = initial_state("resnet10t", 4, seed=2)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
    # a plain state dict that loads into a fresh model of the same shape
    model = create_model("resnet10t", 4)
    model.load_state_dict(a)


def test_normalization_is_imagenet_for_resnet():
    mean, std = normalization(create_model("resnet10t", 2))
    assert len(mean) == len(std) == 3
    assert mean == pytest.approx([0.485, 0.456, 0.406], abs=1e-3)
    assert std == pytest.approx([0.229, 0.224, 0.225], abs=1e-3)
