"""The shared start: its init file, its content id, and the inputs of a model trained from it."""

from __future__ import annotations

import numpy as np
import torch

from trainables.start import Start


def test_a_start_round_trips_through_its_init_file(tmp_path):
    start = Start({"w": torch.randn(3), "n": torch.tensor(2)}, [0.4] * 3, [0.2] * 3, "warm",
                  {"val_acc": 0.8, "epochs": 2}, "resnet10t")
    start.save(tmp_path / "init.pt")
    back = Start.load(tmp_path / "init.pt")
    assert (back.kind, back.model, back.facts, back.mean) == ("warm", "resnet10t",
                                                              start.facts, start.mean)
    assert back.id == start.id and back.record() == {"kind": "warm", "id": start.id,
                                                     **start.facts}


def test_the_id_names_the_weights_not_the_object():
    a = Start({"w": torch.ones(2)}, [0.0] * 3, [1.0] * 3, "random")
    b = Start({"w": torch.ones(2)}, [0.5] * 3, [1.0] * 3, "pretrained")
    c = Start({"w": torch.tensor([1.0, 1.0001])}, [0.0] * 3, [1.0] * 3, "random")
    assert a.id == b.id != c.id and len(a.id) == 12


def test_inputs_carry_the_start_and_the_images_to_train_on():
    start = Start({"w": torch.ones(2)}, [0.1] * 3, [0.2] * 3, "warm")
    inputs = start.inputs("DATA", [3, 1], np.array([], np.int64), split_hash="h")
    assert inputs.data == "DATA" and inputs.init_state is start.state
    assert inputs.init_id == start.id and inputs.split_hash == "h"
    assert inputs.train_idx.tolist() == [3, 1] and len(inputs.val_idx) == 0
    assert inputs.mean == start.mean and inputs.std == start.std
    assert start.inputs("DATA", [0], [1], state_ref="REF").init_state == "REF"
