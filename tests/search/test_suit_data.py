"""Settings the data decides: images without an up or down train with the exact symmetries."""

from __future__ import annotations

import numpy as np

from conftest import every_way, upright_scenes
from search.config import parse_config
from search.stages import suit_data
from trainables.data import ImageData


def _data(images: np.ndarray) -> ImageData:
    return ImageData(images=images, labels=np.arange(len(images)) % 2, class_names=["a", "b"],
                     ids=[str(i) for i in range(len(images))])


def test_images_without_an_up_train_with_quarter_turns_unless_the_user_chose():
    from search.budget import recipe_space

    upright = upright_scenes(60)
    free = _data(every_way(upright))
    cfg = parse_config(["--data", "x"])
    assert not cfg.train.dihedral and recipe_space(cfg)["augment"] == "light"
    assert suit_data(cfg, _data(upright)) == cfg  # photos keep their up
    suited = suit_data(cfg, free)
    assert suited.train.dihedral and suited.space["augment"] == ["none", "strong"]
    assert recipe_space(suited)["augment"] == "none"  # the recipe: the symmetries and flips
    for told in (["--no-dihedral"], ["--augment", "light"],  # the user decides
                 ["--space", "dihedral=[true,false]"]):
        assert not suit_data(parse_config(["--data", "x", *told]), free).train.dihedral
    own = parse_config(["--data", "x", "--space", "augment=[light,none]"])
    assert suit_data(own, free).space["augment"] == ["light", "none"]  # their choices stay
