"""GPU speed: does a trial keep one GPU busy? Our trial against a bare PyTorch loop, per option.

    python -m benchmarks.gpu [--epochs 4] [--repeats 3] [--images 20480] [--threads N]
                             [--models resnet10t resnet50] [--rows ...] [--quick] [--cpu]

Needs CUDA: without it, it says so and exits 0 (--cpu runs the rows on the CPU anyway, to check
the benchmark itself; those figures say nothing about GPUs). For resnet10t at 64 px (batch 256)
and resnet50 at 224 px (batch 128), on the sign-language photos (the search's split; the train
split repeated to --images images per epoch), in this process without Ray, per repeat:

- bare: a plain PyTorch loop (fused AdamW, fp16 autocast + GradScaler, channels_last,
  cudnn.benchmark) on one normalised batch already on the GPU: the model's own speed, the ceiling;
- ours: `trainables.train.fit` with the default settings, as a one-worker trial runs it: 'light'
  augmentation on the GPU, the decoded images resident in GPU memory (a batch is an index into
  them), AMP auto (fp16 on CUDA), fused AdamW, channels_last, cudnn.benchmark;
- ours_stream: the same with the images streamed from host memory (--device-data stream: loader
  processes gather batches into page-locked memory, copied one batch ahead on a side stream);
- ours_strong: the default with 'strong' augmentation;
- ours_host_aug: augmenting on the host with OpenCV (--augment-device cpu), then copied;
- ours_amp_off, ours_plain (no channels_last, pinned memory, cudnn.benchmark), ours_compile:
  optional rows (--rows);
- two_trials: two `fit` processes on the one GPU at once, each with half the threads and its
  own resident copy of the images, as two trials with --gpus-per-worker 0.5 share it; their
  images/s summed.

Per row: training images/s of epochs 2..E (each trial evaluates val every epoch, outside that
figure), milliseconds per step next to the bare step's, the share of training time waiting for
data, the GPU memory peak. For `ours` also the host synchronisations per training step, counted
with torch.cuda.set_sync_debug_mode: one epoch of 20 steps and one of 40, the difference over 20
(the epoch's own reads, its loss and the val predictions, cancel out). Ratios: ours / bare
(goal >= 0.95), two trials / one. --quick: resnet10t only, 1 repeat, 2 epochs, 2,048 images
unless --images says, the first 64 photos of each class.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import header, mean_std, require_signs

MODELS = {"resnet10t": (64, 256), "resnet50": (224, 128)}  # image size, batch size
OURS = {"ours": {}, "ours_stream": {"device_data": "stream"}, "ours_strong": {"augment": "strong"},
        "ours_host_aug": {"augment_device": "cpu"}, "ours_amp_off": {"amp": "off"},
        "ours_plain": {"channels_last": False, "pin_memory": False, "cudnn_benchmark": False},
        "ours_compile": {"torch_compile": True}}
ROWS = ("bare", *OURS, "two_trials")
DEFAULT_ROWS = ("bare", "ours", "ours_stream", "ours_strong", "ours_host_aug", "two_trials")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=None,
                   help="training images per epoch (default 20480; 2048 with --quick)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads of the trial (default: all)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=ROWS)
    p.add_argument("--no-syncs", action="store_true", help="skip counting host syncs per step")
    p.add_argument("--data", default=None, help="class folders (default: the sign photos)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (checks the benchmark)")
    args = p.parse_args(argv)
    args.per_class = None
    if args.quick:
        args.models, args.repeats, args.epochs, args.per_class = ["resnet10t"], 1, 2, 64
    args.images = args.images or (2048 if args.quick else 20480)
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (epoch 1 is warm-up)")
    return args


def save_inputs(model: str, args: argparse.Namespace, folder: Path) -> None:
    """Decodes the photos at the model's size once and saves what every row trains on."""
    from benchmarks.data_path import load
    from trainables.models import create_model, initial_state, normalization

    data, split = load(Path(args.data) if args.data else require_signs(), MODELS[model][0],
                       args.per_class)
    mean, std = normalization(create_model(model, data.num_classes))
    np.save(folder / "images.npy", data.images)
    np.savez(folder / "rest.npz", labels=data.labels, val=split.val, mean=mean, std=std,
             train=np.resize(split.train, args.images))
    import torch

    torch.save(initial_state(model, data.num_classes, seed=0), folder / "init.pt")


def load_inputs(folder: Path):
    """The saved inputs; the images memory-mapped, as a worker reads Ray's object store."""
    import torch

    from trainables.data import ImageData
    from trainables.inputs import TrialInputs

    rest = np.load(folder / "rest.npz")
    labels = rest["labels"]
    data = ImageData(images=np.load(folder / "images.npy", mmap_mode="r"), labels=labels,
                     class_names=[str(k) for k in range(int(labels.max()) + 1)], ids=[])
    return TrialInputs(data=data, init_state=torch.load(folder / "init.pt", weights_only=True),
                       train_idx=rest["train"], val_idx=rest["val"],
                       mean=rest["mean"].tolist(), std=rest["std"].tolist())


def fit_row(inputs, model: str, threads: int, seed: int, epochs: int, **overrides) -> dict:
    """`fit` as a one-worker trial runs it; images/s and wait share of epochs 2..E."""
    import torch

    from trainables.train import TrainConfig, fit

    cfg = TrainConfig(**{"model": model, "lr": 1e-3, "batch_size": MODELS[model][1],
                         "epochs": epochs, "augment": "light", "seed": seed, "threads": threads,
                         "keep_last": 0} | overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    got: list[dict] = []
    start = time.perf_counter()
    fit(cfg, inputs, None, report=lambda m: got.append(m | {"at": time.perf_counter()}))
    ends = [start] + [m["at"] for m in got]
    later = got[1:]
    img_s = float(np.mean([m["train_images_per_s"] for m in later]))
    return {"img_s": img_s, "step_ms": 1000 * MODELS[model][1] / img_s,
            "wait": float(np.mean([m["data_wait_share"] for m in later])),
            "mem_gb": _peak_gb(),
            "first_s": ends[1] - ends[0], "epoch_s": float(np.mean(np.diff(ends[1:])))}


def syncs_per_step(inputs, model: str, threads: int) -> float:
    """Host synchronisations per training step of `fit` (defaults), from sync-debug warnings:
    an epoch of 40 steps less one of 20, over 20 (everything per epoch cancels out)."""
    import dataclasses
    import warnings

    import torch

    from trainables.train import TrainConfig, fit

    bs = MODELS[model][1]
    counts = []
    for steps in (20, 20, 40):  # the first run warms up (cudnn autotuning, allocations)
        cut = dataclasses.replace(inputs, train_idx=inputs.train_idx[:steps * bs],
                                  val_idx=inputs.val_idx[:bs])
        cfg = TrainConfig(model=model, lr=1e-3, batch_size=bs, epochs=1, augment="light",
                          threads=threads, keep_last=0)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fit(cfg, cut, None)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in seen))
    print(f"  host syncs in an epoch: {counts[1]} with 20 steps, {counts[2]} with 40", flush=True)
    return (counts[2] - counts[1]) / 20


def bare_row(inputs, model: str, steps: int) -> dict:
    """Training steps on one normalised batch already on the device (after 5 warm-up steps)."""
    import torch

    from trainables.augment import normalize
    from trainables.models import create_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.backends.cudnn.benchmark = True
    net = create_model(model, len(inputs.data.class_names))
    net.load_state_dict(inputs.init_state)
    net.to(device, memory_format=fmt).train()
    # fused where it exists, as ours: the ceiling is the model's own speed
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4,
                            fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    idx = inputs.train_idx[:MODELS[model][1]]
    x = torch.from_numpy(inputs.data.images[idx]).permute(0, 3, 1, 2).to(device)
    x = normalize(x, inputs.mean, inputs.std).contiguous(memory_format=fmt)
    y = torch.from_numpy(inputs.data.labels[idx]).to(device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 5):
        if i == 5:
            _sync()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    _sync()
    img_s = len(idx) * steps / (time.perf_counter() - start)
    return {"img_s": img_s, "step_ms": 1000 * len(idx) / img_s, "wait": 0.0,
            "mem_gb": _peak_gb()}


def _trial_process(folder: str, model: str, threads: int, epochs: int, seed: int,
                   barrier, results) -> None:
    """One of the two trials sharing the GPU: starts training when the other is ready too."""
    inputs = load_inputs(Path(folder))
    barrier.wait()
    results.put(fit_row(inputs, model, threads, seed, epochs, gpu_share=0.5))


def two_trials_row(folder: Path, model: str, args: argparse.Namespace, seed: int) -> dict:
    """Two trials in two processes on the one GPU at once; their images/s summed."""
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    barrier, results = ctx.Barrier(2), ctx.Queue()
    threads = max(1, args.threads // 2)
    procs = [ctx.Process(target=_trial_process, args=(str(folder), model, threads, args.epochs,
                                                      seed + k, barrier, results))
             for k in range(2)]
    for proc in procs:
        proc.start()
    rows = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    img_s = sum(r["img_s"] for r in rows)
    return {"img_s": img_s, "step_ms": 1000 * MODELS[model][1] / img_s,
            "wait": float(np.mean([r["wait"] for r in rows])),
            "mem_gb": sum(r["mem_gb"] for r in rows)}


def one_repeat(folder: Path, model: str, args: argparse.Namespace, rep: int) -> dict[str, dict]:
    """Every asked-for row once, in the order of ROWS."""
    inputs = load_inputs(folder)
    out: dict[str, dict] = {}
    for row in args.rows:
        try:
            if row == "bare":
                steps = len(inputs.train_idx) // MODELS[model][1] * (args.epochs - 1)
                out[row] = bare_row(inputs, model, steps)
            elif row == "two_trials":
                out[row] = two_trials_row(folder, model, args, seed=rep)
            else:
                out[row] = fit_row(inputs, model, args.threads, rep, args.epochs, **OURS[row])
        except Exception:  # a row that fails is reported, the others still measured
            import traceback

            traceback.print_exc()
            nan = float("nan")
            out[row] = {"img_s": nan, "step_ms": nan, "wait": nan, "mem_gb": nan}
        r = out[row]
        print(f"  repeat {rep} {row}: {r['img_s']:.0f} img/s, {r['step_ms']:.2f} ms/step, "
              f"data wait {r['wait']:.1%}, "
              f"GPU memory peak {r['mem_gb']:.2f} GB"
              + (f", epoch 1 {r['first_s']:.1f} s vs {r['epoch_s']:.1f} s later"
                 if "first_s" in r else ""), flush=True)
    return out


def table(model: str, reps: list[dict[str, dict]]) -> None:
    """Mean ± std per row, then the ratios the issue asks about, taken within each repeat."""
    rows = list(reps[0])
    print(f"\n{model}\n\n| row | img/s | / bare | ms per step | data wait share | "
          "GPU memory peak (GB) |\n|---|---|---|---|---|---|")
    for row in rows:
        rel = (mean_std([r[row]["img_s"] / r["bare"]["img_s"] for r in reps])
               if "bare" in rows else "")
        print(f"| {row} | {mean_std([r[row]['img_s'] for r in reps])} | {rel} | "
              f"{mean_std([r[row]['step_ms'] for r in reps])} | "
              f"{mean_std([r[row]['wait'] for r in reps])} | "
              f"{mean_std([r[row]['mem_gb'] for r in reps])} |")
    for a, b, goal in (("ours", "bare", " (goal >= 0.95)"), ("ours_stream", "bare", ""),
                       ("ours_strong", "bare", ""), ("ours_host_aug", "bare", ""),
                       ("ours", "ours_amp_off", " (AMP's speed-up)"),
                       ("ours", "ours_plain", " (channels_last + pinned + cudnn.benchmark)"),
                       ("ours_compile", "ours", ""), ("two_trials", "ours", "")):
        if a in rows and b in rows:
            ratio = [r[a]["img_s"] / r[b]["img_s"] for r in reps]
            print(f"ratio {model} {a}/{b} {mean_std(ratio)}{goal}")
    if "ours_compile" in rows:
        compile_s = [r["ours_compile"]["first_s"] - r["ours_compile"]["epoch_s"] for r in reps]
        print(f"{model} torch.compile time (epoch 1 less a later epoch) {mean_std(compile_s)} s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.cpu:
        print("benchmarks.gpu needs CUDA, and torch sees no GPU here: nothing measured "
              "(--cpu checks the benchmark itself on the CPU)")
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(header("gpu speed (sign-language photos, 'light' augmentation)", args.repeats,
                 f"{device}, {args.epochs} epochs of {args.images} images, {args.threads} "
                 f"threads, models {args.models}"), flush=True)
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            save_inputs(model, args, Path(tmp))
            print(f"{model} at {MODELS[model][0]} px, batch {MODELS[model][1]}", flush=True)
            table(model, [one_repeat(Path(tmp), model, args, rep) for rep in range(args.repeats)])
            if torch.cuda.is_available() and not args.no_syncs:
                print(f"{model} host syncs per training step (defaults): "
                      f"{syncs_per_step(load_inputs(Path(tmp)), model, args.threads):g} "
                      "(goal 0)", flush=True)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


if __name__ == "__main__":
    main()
