"""Distillation into one student: the loss on hand-built cases (fast), then
`python -m ensemble.distill` with pseudo-labels end to end on a tiny real search."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ensemble
from conftest import image_folder, run_module, write_image
from ensemble.distill import main as distill_main
from trainables.checkpoint import Checkpoint
from trainables.data import decode_images
from trainables.train import DistillLoss, distillation_loss

slow = pytest.mark.slow


def _loss(logits, teacher, label, *, t, alpha) -> float:
    return float(distillation_loss(torch.tensor([logits]), torch.tensor([teacher]),
                                   torch.tensor([label]), temperature=t, alpha=alpha))


def test_kd_loss_at_temperature_1():
    # student p = [1/4, 3/4], teacher [1/2, 1/2]: KL = 1/2 ln 2 + 1/2 ln(2/3), CE(label 0) = ln 4
    kl, ce = 0.5 * math.log(2) + 0.5 * math.log(2 / 3), math.log(4)
    got = _loss([0.0, math.log(3)], [0.5, 0.5], 0, t=1.0, alpha=0.5)
    assert got == pytest.approx(0.5 * kl + 0.5 * ce, rel=1e-5)


def test_kd_loss_softens_the_teacher_and_scales_by_t_squared():
    # teacher [0.8, 0.2] at T=2: p^(1/2) renormalised = [2/3, 1/3]; student [0, 0] -> [1/2, 1/2]
    kl = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    got = _loss([0.0, 0.0], [0.8, 0.2], 1, t=2.0, alpha=0.25)
    assert got == pytest.approx(0.25 * 4 * kl + 0.75 * math.log(2), rel=1e-5)


def test_kd_loss_averages_over_the_batch_and_alpha_bounds():
    logits = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])
    teacher = torch.tensor([[0.5, 0.5], [0.8, 0.2]])
    labels = torch.tensor([0, 1])
    both = float(distillation_loss(logits, teacher, labels, temperature=2.0, alpha=0.3))
    rows = [_loss([0.0, math.log(3)], [0.5, 0.5], 0, t=2.0, alpha=0.3),
            _loss([0.0, 0.0], [0.8, 0.2], 1, t=2.0, alpha=0.3)]
    assert both == pytest.approx(np.mean(rows), rel=1e-5)
    ce = float(torch.nn.functional.cross_entropy(logits, labels))
    assert float(distillation_loss(logits, teacher, labels, temperature=3.0, alpha=0.0)) == \
        pytest.approx(ce)
    # a student that already matches the softened teacher has no soft loss left
    assert float(distillation_loss(teacher.log(), teacher, labels, temperature=3.0,
                                   alpha=1.0)) == pytest.approx(0.0, abs=1e-6)


def test_distill_criterion_refuses_batches_out_of_order():
    soft = np.full((4, 2), 0.5, np.float32)
    labels = np.array([0, 1, 0, 1])
    crit = DistillLoss(soft, labels, torch.nn.CrossEntropyLoss(), temperature=2.0, alpha=0.5)
    logits = torch.zeros(2, 2)
    assert float(crit(logits, (torch.tensor([0, 1]), np.array([2, 3]), True))) > 0
    with pytest.raises(RuntimeError, match="do not match"):
        crit(logits, (torch.tensor([0, 1]), np.array([1, 2]), True))
    # checked on an epoch's first batch only: the others read nothing back from the device
    assert float(crit(logits, (torch.tensor([0, 1]), np.array([1, 2]), False))) > 0


# ---------------------------------------------------------------------- end to end


def _unlabelled(work: Path, split: dict) -> Path:
    """Renamed byte copies of 2 val and 2 test images, 6 new images, one file that is no image
    and one image of another size."""
    out = work / "unlabelled"
    out.mkdir()
    for part in ("val", "test"):
        for j, rel in enumerate(split["ids"][part][:2]):
            shutil.copy(work / "images" / rel, out / f"copy_{part}_{j}.png")
    rng = np.random.default_rng(11)
    for i in range(6):
        write_image(out / f"new_{i}.png", i % 3, rng)
    write_image(out / "large.png", 0, rng, size=40)
    (out / "broken.png").write_bytes(b"not an image")
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> dict:
    """A tiny search; its two trials as a saved vote (the teacher); one distillation run."""
    from models.artifact import Vote

    work = tmp_path_factory.mktemp("kd")
    image_folder(work / "images")
    proc = run_module("search.run", [
        "--data", str(work / "images"), "--image-size", "24", "--num-samples", "2",
        "--max-epochs", "2", "--grace-period", "2", "--space", "batch_size=[8]",
        "--experiment", "kd", "--num-cpus", "2", "--no-refit", "--init", "random"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = work / "runs" / "kd"
    members = sorted(str(p) for p in (exp / "checkpoints").glob("*/best.pt"))
    Vote(members, [0.5, 0.5]).save(exp / "ensemble" / "ensemble.pt")
    split = json.loads((exp / "split.json").read_text())
    args = ["--experiment", "kd", "--pseudo-label", str(_unlabelled(work, split)),
            "--pseudo-threshold", "0.01", "--epochs", "1", "--num-cpus", "2"]
    proc = run_module("ensemble.distill", args, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (exp / "students").iterdir()
    return {"work": work, "exp": exp, "split": split, "dir": folder, "args": args,
            "stderr": proc.stderr}


@slow
def test_student_is_reported_beside_teacher_and_best_single(student):
    report = json.loads((student["dir"] / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["best single", "teacher (ensemble.pt)", "student (resnet10t)"]
    best, teacher, pupil = report["rows"]
    for r in report["rows"]:
        assert set(r["test"]) == {"accuracy", "f1", "loss", "ece"} and r["ms_per_image"] > 0
    assert pupil["params_x_members"] == best["params_x_members"]  # 1x cost
    assert teacher["params_x_members"] == 2 * best["params_x_members"]
    assert report["temperature"] == 4.0 and report["alpha"] == 0.9
    md = (student["dir"] / "report.md").read_text()
    assert "| student (resnet10t) |" in md
    assert "of the teacher's gap" in md or "no gap to close" in md

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{student['work'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kd")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'student'")
    assert run.data.tags.get("search_run_id")
    assert "test_accuracy" in run.data.metrics and "teacher.test_accuracy" in run.data.metrics
    assert run.data.params["kd_alpha"] == "0.9" and run.data.params["train.mixup"] == "0.0"


@slow
def test_pseudo_labels_never_include_val_or_test_images(student):
    facts = json.loads((student["dir"] / "report.json").read_text())["pseudo"]
    assert facts["copies_of_val_or_test"] == 4 and facts["wrong_size"] == 1
    assert facts["readable"] == 11 and facts["taken"] == 6
    assert sum(facts["per_class"].values()) == 6
    taken = pd.read_csv(student["dir"] / "pseudo_labels.csv")
    assert sorted(taken["image"]) == [f"new_{i}.png" for i in range(6)]
    # checked by content, not by name: no taken image decodes like a val or test image
    data = np.load(student["exp"] / "data.npz")["images"]
    held = {data[i].tobytes() for i in student["split"]["val"] + student["split"]["test"]}
    pixels, _ = decode_images([student["work"] / "unlabelled" / f for f in taken["image"]], 24)
    assert not {p.tobytes() for p in pixels} & held
    assert "broken.png" in student["stderr"] and "large.png" in student["stderr"]


@slow
def test_student_loads_and_joins_the_ensemble_table(student):
    from ensemble.combiners import Pool, student_rows
    from ensemble.members import open_search

    path = student["dir"] / "best.pt"
    ckpt = Checkpoint.load(path)
    assert ckpt.split_hash == student["split"]["hash"]
    model = ensemble.load(path)
    data = np.load(student["exp"] / "data.npz")["images"]
    probs = model.predict_proba(data[:4])
    assert probs.shape == (4, 3) and np.allclose(probs.sum(1), 1, atol=1e-4)
    state = open_search(str(student["work"] / "runs"), "kd")
    (row,) = student_rows(Pool(state, [], []))
    assert row.name == f"student {student['dir'].name}" and row.artifact is not None
    assert 0 <= row.test["accuracy"] <= 1


@slow
def test_a_finished_student_is_not_trained_again(student):
    path = student["dir"] / "best.pt"
    before = path.stat().st_mtime_ns
    proc = run_module("ensemble.distill", student["args"], student["work"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already trained: reusing it" in proc.stderr
    assert path.stat().st_mtime_ns == before


@slow
@pytest.mark.parametrize("case,needle", [
    ("other-classes", "pass a teacher built from this experiment"),
    ("alpha", "--alpha within 0..1"),
    ("student", "timm has no model named"),
    ("pseudo", "does not exist"),
])
def test_bad_input_is_one_sentence_and_changes_nothing(student, tmp_path, case, needle,
                                                       capsys, monkeypatch):
    monkeypatch.chdir(student["work"])
    args = ["--experiment", "kd"]
    if case == "other-classes":  # a teacher of another experiment: same size, other classes
        foreign = Checkpoint.load(next((student["exp"] / "checkpoints").glob("*/best.pt")))
        foreign.class_names = ["x", "y", "z"]
        foreign.save(tmp_path / "foreign.pt")
        args += ["--teacher", str(tmp_path / "foreign.pt")]
    else:
        args += {"alpha": ["--alpha", "1.5"], "student": ["--student", "resnet_nope"],
                 "pseudo": ["--pseudo-label", str(tmp_path / "missing")]}[case]
    before = sorted(p.name for p in (student["exp"] / "students").iterdir())
    assert distill_main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error:") and needle in err and "Traceback" not in err
    assert sorted(p.name for p in (student["exp"] / "students").iterdir()) == before
