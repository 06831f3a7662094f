"""The training loop on a tiny real run without Ray: metrics, reports, checkpoints, determinism."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
import torch

from models.artifact import load_model
from trainables.checkpoint import Checkpoint, load_checkpoint
from trainables.data import ImageData, load_data
from trainables.models import initial_state
from trainables.schedules import SCHEDULERS, LRSchedule
from trainables.split import Split, draw_split
from trainables.store import finished, resume_path
from trainables.train import (
    TrainConfig,
    TrialInputs,
    amp_dtype,
    fit,
    predict_proba,
)

BASE = TrainConfig(model="resnet10t", epochs=2, batch_size=16, threads=1, amp="off", keep_last=0)
REPORT_KEYS = {"epoch", "train_loss", "val_loss", "val_acc", "val_f1", "lr",
               "best_val_acc", "best_val_loss", "best_val_f1", "best_epoch", "progress"}


@pytest.fixture
def tiny(make_folder) -> tuple[ImageData, Split, TrialInputs]:
    data = load_data(make_folder(classes=3, per_class=8), image_size=32)
    split = draw_split(data.labels, val_fraction=0.25, test_fraction=0.15, seed=0,
                       class_names=data.class_names)
    init = initial_state("resnet10t", data.num_classes, seed=0)
    inputs = TrialInputs(data=data, init_state=init, train_idx=split.train, val_idx=split.val)
    return data, split, inputs


def _mean_std(inputs: TrialInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(inputs.mean).view(1, 3, 1, 1),
            torch.tensor(inputs.std).view(1, 3, 1, 1))


def test_fit_reports_every_epoch_and_returns_best(tiny, tmp_path):
    data, split, inputs = tiny
    reports: list[dict] = []
    cfg = dataclasses.replace(BASE, epochs=3)
    best = fit(cfg, inputs, str(tmp_path / "ckpt" / "best.pt"), report=reports.append)

    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert [r["progress"] for r in reports] == [1 / 3, 2 / 3, 1.0]  # ASHA's clock
    for r in reports:
        assert REPORT_KEYS <= set(r), REPORT_KEYS - set(r)
        assert 0.0 <= r["val_acc"] <= 1.0 and 0.0 <= r["val_f1"] <= 1.0
        assert math.isfinite(r["val_loss"]) and r["val_loss"] > 0
        assert math.isfinite(r["train_loss"])
    # best_* is the running best (accuracy first, then loss)
    for i, r in enumerate(reports):
        seen = reports[:i + 1]
        assert r["best_val_acc"] == max(s["val_acc"] for s in seen)
    assert set(best) == {"val_acc", "val_loss", "val_f1", "epoch"}
    assert best["val_acc"] == max(r["val_acc"] for r in reports)
    winner = reports[best["epoch"] - 1]
    assert best["val_loss"] == winner["val_loss"] and best["val_f1"] == winner["val_f1"]
    assert reports[-1]["best_epoch"] == best["epoch"]


def test_checkpoint_is_a_plain_dict_written_atomically(tiny, tmp_path):
    data, split, inputs = tiny
    path = tmp_path / "ckpt" / "best.pt"
    best = fit(BASE, inputs, str(path))

    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp file left behind
    raw = load_checkpoint(path)  # weights_only=True: plain types and tensors only
    assert type(raw) is dict
    assert {"model", "config", "class_names", "val_probs"} <= set(raw)
    ckpt = Checkpoint.load(path)
    assert ckpt.config == dataclasses.asdict(BASE)
    assert ckpt.train_config == BASE
    assert ckpt.class_names == data.class_names
    assert ckpt.image_size == 32
    assert ckpt.epoch == best["epoch"]
    assert ckpt.metrics["val_acc"] == pytest.approx(best["val_acc"])
    assert np.array_equal(ckpt.val_indices, split.val)
    probs = ckpt.val_probs
    assert probs.shape == (len(split.val), data.num_classes)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    # the model actually trained: its weights moved away from the shared initial state
    moved = [k for k, v in ckpt.model.items()
             if v.is_floating_point() and not torch.equal(v, inputs.init_state[k])]
    assert moved


def test_load_model_reproduces_val_probs(tiny, tmp_path):
    data, split, inputs = tiny
    path = tmp_path / "best.pt"
    fit(BASE, inputs, str(path))
    model, ckpt = load_model(path, torch.device("cpu"))
    assert not model.training
    mean, std = _mean_std(inputs)
    probs = predict_proba(model, data.images, split.val, mean=mean, std=std)
    assert probs.shape == (len(split.val), data.num_classes)
    assert np.allclose(probs, ckpt.val_probs, atol=1e-5)
    # also from the loaded checkpoint itself
    model2, _ = load_model(ckpt, torch.device("cpu"))
    probs2 = predict_proba(model2, data.images, split.val, mean=mean, std=std, batch_size=2)
    assert np.allclose(probs2, probs, atol=1e-5)


def test_predict_proba_all_images_and_empty(tiny):
    data, _, inputs = tiny
    model, _ = load_model(Checkpoint(inputs.init_state, dataclasses.asdict(BASE),
                                     data.class_names, 32, inputs.mean, inputs.std),
                          torch.device("cpu"))
    mean, std = _mean_std(inputs)
    probs = predict_proba(model, data.images, mean=mean, std=std, batch_size=5)
    assert probs.shape == (len(data.labels), 3)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    empty = predict_proba(model, data.images, np.array([], np.int64), mean=mean, std=std)
    assert empty.shape == (0, 3)


def test_same_seed_same_result(tiny, tmp_path):
    _, _, inputs = tiny
    cfg = dataclasses.replace(BASE, batch_size=4)
    runs = []
    for name in ("a", "b"):
        reports: list[dict] = []
        best = fit(cfg, inputs, str(tmp_path / f"{name}.pt"), report=reports.append)
        runs.append((best, reports, Checkpoint.load(tmp_path / f"{name}.pt")))
    (best_a, rep_a, ck_a), (best_b, rep_b, ck_b) = runs
    assert best_a == best_b
    assert [r["train_loss"] for r in rep_a] == [r["train_loss"] for r in rep_b]
    assert np.array_equal(ck_a.val_probs, ck_b.val_probs)
    for k in ck_a.model:
        assert torch.equal(ck_a.model[k], ck_b.model[k]), k

    other: list[dict] = []
    fit(dataclasses.replace(cfg, seed=1), inputs, None, report=other.append)
    assert [r["train_loss"] for r in other] != [r["train_loss"] for r in rep_a]


def test_same_seed_same_result_with_mixup(tiny):
    _, _, inputs = tiny
    cfg = dataclasses.replace(BASE, batch_size=4, mixup=0.4)
    losses = []
    for outside in (1, 2):  # unrelated code touched numpy's global RNG before the trial
        np.random.seed(outside)
        reports: list[dict] = []
        fit(cfg, inputs, None, report=reports.append)
        losses.append([r["train_loss"] for r in reports])
    assert losses[0] == losses[1]


@pytest.mark.parametrize("extra", [
    {"accum_steps": 2},
    {"mixup": 0.2},
    {"label_smoothing": 0.1},
    {"mixup": 0.2, "cutmix": 1.0, "label_smoothing": 0.1},
    {"grad_clip": 1.0, "optimizer": "sgd", "lr": 0.01},
    {"augment": "strong", "hflip": True},
    {"augment": "none", "scheduler": "plateau", "warmup_epochs": 1},
    {"amp": "bf16"},
    {"augment": "light", "dihedral": True},
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_training_options_run(tiny, extra):
    _, _, inputs = tiny
    cfg = dataclasses.replace(BASE, batch_size=4, **extra)
    reports: list[dict] = []
    best = fit(cfg, inputs, None, report=reports.append)
    assert len(reports) == cfg.epochs
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in reports)
    assert 0.0 <= best["val_acc"] <= 1.0
    assert reports[0]["train_images_per_s"] > 0


def test_accumulation_still_updates_weights(tiny, tmp_path):
    _, _, inputs = tiny
    path = tmp_path / "acc.pt"
    # 14 train images / batch 4 -> 3 batches; accum 2 -> the last update has one micro-batch
    fit(dataclasses.replace(BASE, batch_size=4, accum_steps=2, epochs=1), inputs, str(path))
    state = Checkpoint.load(path).model
    assert any(not torch.equal(v, inputs.init_state[k])
               for k, v in state.items() if v.is_floating_point())


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedule_warms_up_then_decays(name):
    peak, epochs, per_epoch = 0.1, 6, 5
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=peak)
    sched = LRSchedule(name, opt, epochs=epochs, updates_per_epoch=per_epoch, warmup_epochs=1)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(epochs):
        for _ in range(per_epoch):
            param.grad = torch.ones(1)
            opt.step()
            sched.after_update()
            lrs.append(opt.param_groups[0]["lr"])
        sched.after_epoch(1.0)  # a flat validation loss
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] < 0.5 * peak, f"{name}: no warmup, starts at {lrs[0]}"
    # timm counts warmup inside the cosine (warmup_prefix=False): its top is a little below peak
    assert max(lrs) == pytest.approx(peak, rel=0.1), name
    assert max(lrs) <= peak * (1 + 1e-6)
    if name == "constant":
        assert lrs[-1] == pytest.approx(peak)
    else:
        assert lrs[-1] < 0.5 * peak, f"{name}: ends at {lrs[-1]}"


def test_cosine_reaches_peak_after_warmup():
    peak, epochs, per_epoch = 0.1, 10, 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = LRSchedule("cosine", opt, epochs=epochs, updates_per_epoch=per_epoch,
                       warmup_epochs=3)
    lrs = []
    for _ in range(epochs * per_epoch):
        opt.step()
        sched.after_update()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(peak, rel=0.02)


@pytest.mark.parametrize("name", ["cosine", "constant", "step"])
def test_schedule_without_warmup_starts_at_peak(name):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    LRSchedule(name, opt, epochs=4, updates_per_epoch=3, warmup_epochs=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_unknown_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="linear"):
        LRSchedule("linear", opt, epochs=2, updates_per_epoch=1)


def test_amp_dtype_on_cpu():
    cpu = torch.device("cpu")
    assert amp_dtype("off", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    assert amp_dtype("fp16", cpu) is torch.float16
    assert amp_dtype("auto", cpu) in (None, torch.bfloat16)
    assert amp_dtype("auto", torch.device("cuda")) is torch.float16
    assert amp_dtype("off", torch.device("cuda")) is None


def test_train_config_from_dict_ignores_other_keys():
    cfg = TrainConfig.from_dict({"lr": 0.5, "epochs": 3, "trial_id": "x", "num_samples": 9})
    assert cfg.lr == 0.5 and cfg.epochs == 3
    assert cfg.batch_size == TrainConfig().batch_size


def test_fit_without_checkpoint_path_writes_nothing(tiny, tmp_path, monkeypatch):
    _, _, inputs = tiny
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    best = fit(dataclasses.replace(BASE, epochs=1), inputs, None)
    assert best["epoch"] == 1
    assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------- fine-tuning, averaging, imbalance


def _backbone_and_head(model_state: dict) -> tuple[dict, dict]:
    head = {k: v for k, v in model_state.items() if k.startswith("fc.")}
    body = {k: v for k, v in model_state.items() if not k.startswith("fc.")}
    return body, head


def test_frozen_backbone_epochs_leave_the_backbone_unchanged(tiny, tmp_path):
    _, _, inputs = tiny
    path = tmp_path / "frozen.pt"
    fit(dataclasses.replace(BASE, batch_size=4, epochs=1, freeze_epochs=1), inputs, str(path))
    body, head = _backbone_and_head(Checkpoint.load(path).model)
    init_body, init_head = _backbone_and_head(inputs.init_state)
    for k, v in body.items():  # weights and BatchNorm statistics alike
        assert torch.equal(v, init_body[k]), k
    assert any(not torch.equal(v, init_head[k]) for k, v in head.items())
    # after the frozen epochs the whole network trains
    fit(dataclasses.replace(BASE, batch_size=4, epochs=2, freeze_epochs=1, keep_last=1), inputs,
        str(tmp_path / "two" / "best.pt"))
    body, _ = _backbone_and_head(Checkpoint.load(tmp_path / "two" / "epoch_2.pt").model)
    assert any(not torch.equal(v, init_body[k]) for k, v in body.items() if v.is_floating_point())


def test_ema_and_last_epochs_load_as_normal_checkpoints(tiny, tmp_path):
    data, split, inputs = tiny
    cfg = dataclasses.replace(BASE, batch_size=4, epochs=3, ema=0.9, keep_last=2)
    fit(cfg, inputs, str(tmp_path / "t" / "best.pt"))
    names = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert names == ["best.pt", "epoch_2.pt", "epoch_3.pt"]  # no resume state left behind
    best_epoch = Checkpoint.load(tmp_path / "t" / "best.pt").epoch
    for n in (2, 3):  # a last epoch that is also the best is the same file, not a copy
        same = (tmp_path / "t" / f"epoch_{n}.pt").samefile(tmp_path / "t" / "best.pt")
        assert same == (n == best_epoch), (n, best_epoch)
        assert Checkpoint.load(tmp_path / "t" / f"epoch_{n}.pt").epoch == n
    mean, std = _mean_std(inputs)
    for name in names:
        model, ckpt = load_model(tmp_path / "t" / name, torch.device("cpu"))
        probs = predict_proba(model, data.images, split.val, mean=mean, std=std)
        assert np.allclose(probs, ckpt.val_probs, atol=1e-5), name
    # the EMA differs from the raw weights: it is what was evaluated and saved
    raw = dataclasses.replace(cfg, ema=0.0, keep_last=0)
    fit(raw, inputs, str(tmp_path / "raw.pt"))
    ema_state = Checkpoint.load(tmp_path / "t" / "epoch_3.pt").model
    raw_state = Checkpoint.load(tmp_path / "raw.pt").model
    assert any(not torch.equal(ema_state[k], raw_state[k]) for k in raw_state
               if raw_state[k].is_floating_point())


def test_class_weights_follow_inverse_frequency():
    from trainables.train import _class_weights, _sample_weights

    labels = np.array([0] * 8 + [1] * 2)
    balanced = _class_weights("balanced", labels, 2)
    assert balanced[1] / balanced[0] == pytest.approx(4.0)
    assert balanced[labels].mean() == pytest.approx(1.0)
    sqrt = _class_weights("sqrt", labels, 2)
    assert sqrt[1] / sqrt[0] == pytest.approx(2.0)
    assert _class_weights("none", labels, 2) is None
    p = _sample_weights("balanced", labels, 2)
    assert p.sum() == pytest.approx(1.0)
    assert p[labels == 0].sum() == pytest.approx(p[labels == 1].sum())  # classes drawn equally


def test_balanced_sampling_and_weighted_loss_train(tiny):
    _, _, inputs = tiny
    cfg = dataclasses.replace(BASE, batch_size=4, class_weight="balanced", sampler="sqrt",
                              mixup=0.2)
    reports: list[dict] = []
    fit(cfg, inputs, None, report=reports.append)
    assert len(reports) == 2 and all(math.isfinite(r["train_loss"]) for r in reports)


def test_metric_f1_picks_the_best_epoch_by_macro_f1(tiny):
    _, _, inputs = tiny
    reports: list[dict] = []
    best = fit(dataclasses.replace(BASE, batch_size=4, epochs=3, metric="f1"), inputs, None,
               report=reports.append)
    assert best["val_f1"] == max(r["val_f1"] for r in reports)
    for i, r in enumerate(reports):
        assert r["best_val_f1"] == max(s["val_f1"] for s in reports[:i + 1])


def test_refit_without_val_keeps_the_last_epoch(tiny, tmp_path):
    data, split, inputs = tiny
    everything = dataclasses.replace(inputs, train_idx=np.concatenate([split.train, split.val]),
                                     val_idx=np.zeros(0, np.int64))
    reports: list[dict] = []
    best = fit(dataclasses.replace(BASE, batch_size=4, epochs=2), everything,
               str(tmp_path / "final.pt"), report=reports.append)
    assert best == {"epoch": 2} and [r["epoch"] for r in reports] == [1, 2]
    assert not any("val_acc" in r for r in reports)
    ckpt = Checkpoint.load(tmp_path / "final.pt")
    assert ckpt.epoch == 2 and len(ckpt.val_indices) == 0


def test_interrupted_run_resumes_after_its_last_epoch_with_the_same_result(tiny, tmp_path):
    """A retried trial (a lost spot instance) continues from its resume state, not epoch 1, and
    ends where an uninterrupted run ends: each epoch's randomness depends on the epoch only."""
    _, _, inputs = tiny
    cfg = dataclasses.replace(BASE, batch_size=4, epochs=3, ema=0.5)
    fit(cfg, inputs, str(tmp_path / "whole" / "best.pt"))

    class Lost(Exception):
        pass

    def crash_after_two(metrics: dict) -> None:
        if metrics["epoch"] == 2:
            raise Lost

    path = tmp_path / "part" / "best.pt"
    with pytest.raises(Lost):
        fit(cfg, inputs, str(path), report=crash_after_two)
    assert load_checkpoint(resume_path(path))["epoch"] == 2  # the loop's own resume state
    reports: list[dict] = []
    fit(cfg, inputs, str(path), report=reports.append)
    assert [r["epoch"] for r in reports] == [3]  # epochs 1-2 were not trained again
    assert not resume_path(path).exists()
    whole, part = Checkpoint.load(tmp_path / "whole" / "best.pt"), Checkpoint.load(path)
    assert whole.epoch == part.epoch
    for k, v in whole.model.items():
        assert torch.allclose(v.float(), part.model[k].float(), atol=1e-6), k


def test_layer_decay_gives_earlier_layers_smaller_learning_rates():
    import timm
    from timm.optim import create_optimizer_v2

    for name in ("onecycle", "cosine", "plateau"):
        model = timm.create_model("resnet10t", num_classes=3)
        opt = create_optimizer_v2(model, opt="adamw", lr=0.1, layer_decay=0.5)
        sched = LRSchedule(name, opt, epochs=4, updates_per_epoch=5)
        for _ in range(6):
            opt.step()
            sched.after_update()
        lrs = [g["lr"] for g in opt.param_groups]
        scales = [g["lr_scale"] for g in opt.param_groups]
        assert min(scales) < 1.0
        for lr, scale in zip(lrs, scales):
            assert lr == pytest.approx(lrs[-1] * scale / scales[-1], rel=1e-6), name


def test_onecycle_with_very_few_updates(tiny):
    """1 epoch of 2-4 updates used to divide by zero in torch's one-cycle phases."""
    for updates in (1, 2, 3, 4):
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=0.1)
        sched = LRSchedule("onecycle", opt, epochs=1, updates_per_epoch=updates)
        for _ in range(updates):
            opt.step()
            sched.after_update()
        assert math.isfinite(opt.param_groups[0]["lr"])
    _, _, inputs = tiny
    reports: list[dict] = []
    fit(dataclasses.replace(BASE, batch_size=4, epochs=1, scheduler="onecycle"), inputs, None,
        report=reports.append)
    assert len(reports) == 1


@pytest.mark.parametrize("name", ["onecycle", "cosine", "step"])
def test_resized_schedule_continues_as_if_planned_at_that_length(name):
    """A run fitted to a deadline changes its length after its first epochs: from there on its
    learning rates are those of a run planned at the new length from the start."""
    def rates(epochs: int, resize_to: int | None = None) -> list[float]:
        opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=2e-3)
        sched = LRSchedule(name, opt, epochs=epochs, updates_per_epoch=5)
        out = []
        for epoch in range(resize_to or epochs):
            if epoch == 1 and resize_to:
                sched.resize(resize_to)
            for _ in range(5):
                opt.step()
                sched.after_update()
                out.append(opt.param_groups[0]["lr"])
        return out

    planned, stretched, shrunk = rates(12), rates(7, resize_to=12), rates(20, resize_to=12)
    assert len(stretched) == len(shrunk) == len(planned)
    assert stretched[5:] == pytest.approx(planned[5:])
    assert shrunk[5:] == pytest.approx(planned[5:])


def _fitted(tiny, tmp_path, fit_by: float, **kw) -> tuple[list[dict], Checkpoint]:
    _, split, inputs = tiny
    everything = dataclasses.replace(inputs, train_idx=np.concatenate([split.train, split.val]),
                                     val_idx=np.zeros(0, np.int64))
    cfg = dataclasses.replace(BASE, batch_size=4, epochs=3, fit_by=fit_by, fit_cap=5, **kw)
    reports: list[dict] = []
    fit(cfg, everything, str(tmp_path / "final.pt"), report=reports.append)
    return reports, Checkpoint.load(tmp_path / "final.pt")


def test_a_run_with_time_to_spare_stretches_to_its_cap(tiny, tmp_path):
    reports, ckpt = _fitted(tiny, tmp_path, fit_by=time.time() + 1e6)
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4, 5]
    assert reports[-1]["progress"] == 1.0 and ckpt.epoch == 5
    assert ckpt.train_config.epochs == 5  # the checkpoint says how long it trained
    assert reports[-1]["lr"] < 0.01 * BASE.lr  # one-cycle ran to its end, not to epoch 3's


def test_a_run_past_its_deadline_stops_after_the_epoch_it_is_in(tiny, tmp_path):
    reports, ckpt = _fitted(tiny, tmp_path, fit_by=time.time() - 1)
    assert [r["epoch"] for r in reports] == [1, 2] and ckpt.train_config.epochs == 2
    assert ckpt.epoch == 2 and reports[-1]["progress"] == 1.0


def test_a_fitted_run_resumes_at_the_length_it_had_set(tiny, tmp_path):
    """After a crash the run continues to the length its first epochs set, whatever the new
    deadline says, and counts as finished for the same config afterwards."""
    class Lost(Exception):
        pass

    def crash_at_three(metrics: dict) -> None:
        if metrics["epoch"] == 3:
            raise Lost

    _, split, inputs = tiny
    everything = dataclasses.replace(inputs, train_idx=np.concatenate([split.train, split.val]),
                                     val_idx=np.zeros(0, np.int64))
    cfg = dataclasses.replace(BASE, batch_size=4, epochs=3, fit_by=time.time() + 1e6, fit_cap=5)
    path = tmp_path / "final.pt"
    with pytest.raises(Lost):
        fit(cfg, everything, str(path), report=crash_at_three)
    assert TrainConfig.from_dict(load_checkpoint(resume_path(path))["config"]).epochs == 5
    reports: list[dict] = []
    fit(dataclasses.replace(cfg, fit_by=time.time() - 1), everything, str(path),
        report=reports.append)
    assert [r["epoch"] for r in reports] == [4, 5]
    assert Checkpoint.load(path).train_config.epochs == 5
    assert finished(path, cfg) and not finished(path, dataclasses.replace(cfg, fit_by=0.0))


@pytest.mark.parametrize("epoch, left_s, times, expect", [
    (2, 100.0, [10.0], 10.7),  # after epoch 1, 10 s: 1 done + 9.7 more (97 % of 100 s)
    (2, 1000.0, [10.0], 30),   # time to spare: the cap
    (3, 10.0, [20.0, 10.0], 2.97),  # short of time: a share of the epoch about to run ...
    (3, -5.0, [20.0, 10.0], 2.001),  # ... at least a batch of it, even past the deadline
    # at the last three epochs' pace (not the first's): 4 done + 6.79 more
    (5, 70.0, [30.0, 10.0, 10.0, 10.0], 10.79),
    (7, 40.0, [10.0] * 6, 9.88),  # late in the run, shorter when time runs short: 6 + 3.88 ...
    (9, 40.0, [12.0] * 5 + [8.0] * 3, 12.85),  # ... and longer when epochs sped up: 8 + 4.85
    # one slow epoch counts as a third: 7 done + 30 s * 0.97 / 12.67 s (not / 18 s: 8.62)
    (8, 30.0, [10.0] * 6 + [18.0], 7 + 30 * 0.97 / (38 / 3)),
])
def test_a_fitted_length_follows_the_pace_of_its_last_epochs_both_ways(
        epoch, left_s, times, expect):
    from trainables.train import fitted_length

    assert fitted_length(epoch, cap=30, left_s=left_s, times=times) == pytest.approx(expect)


def test_a_run_whose_last_epoch_is_partial_trains_that_share_and_ends_its_schedule(
        tiny, tmp_path):
    """A fitted run ends mid-epoch rather than up to an epoch early: its last epoch trains its
    share of the batches and the one-cycle schedule still runs to its end there."""
    _, split, inputs = tiny
    everything = dataclasses.replace(inputs, train_idx=np.concatenate([split.train, split.val]),
                                     val_idx=np.zeros(0, np.int64))
    cfg = dataclasses.replace(BASE, batch_size=4, epochs=3, last_share=0.5)
    reports: list[dict] = []
    fit(cfg, everything, str(tmp_path / "final.pt"), report=reports.append)
    full = reports[0]["train_images"]  # whole batches of 4
    assert [r["train_images"] for r in reports] == [full, full, round(full / 4 / 2) * 4]
    # one-cycle ended with the last batch (with whole epochs it would be at ~10 % of its peak)
    assert reports[-1]["lr"] < 0.01 * BASE.lr
    assert Checkpoint.load(tmp_path / "final.pt").train_config.last_share == 0.5
