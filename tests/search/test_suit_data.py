"""Settings the data and the machine decide: images without an up or down train with the exact
symmetries; the recipe's batch follows the hardware."""

from __future__ import annotations

import numpy as np

from conftest import every_way, upright_scenes
from search.config import parse_config
from search.stages import suit_data, suit_machine
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


def test_the_recipe_trains_batches_of_32_on_cpus_and_64_on_a_gpu_unless_the_user_chose():
    from search.budget import recipe_space

    cfg = parse_config(["--data", "x"])
    assert suit_machine(cfg, gpus=0) == cfg and recipe_space(cfg)["batch_size"] == 32
    on_gpu = suit_machine(cfg, gpus=1)
    assert on_gpu.space["batch_size"] == [64, 128, 256] and recipe_space(on_gpu)["batch_size"] == 64
    assert suit_machine(parse_config(["--data", "x", "--gpus-per-worker", "0.5"]), gpus=0.5) \
        .space["batch_size"][0] == 64
    own = parse_config(["--data", "x", "--space", "batch_size=[16,32]"])
    assert suit_machine(own, gpus=1).space["batch_size"] == [16, 32]  # their choices stay
    assert recipe_space(own)["batch_size"] == 16
