"""Data path: can the batch loader keep the model fed? Loader and model speeds, and the real loop.

    python -m benchmarks.data_path [--epochs 3] [--batch-size 64] [--image-size 64] [--repeats 3]
                                   [--quick]

On the sign-language photos (decoded once at --image-size, the search's split, seed 0), in this
process without Ray, per repeat:

- loader: `train_batches` over the shuffled train split with the 'light' transform (prefetching as
  in training), no model, --epochs passes; images/s;
- model step: forward + backward + AdamW step of resnet10t (1 thread, autocast as 'auto' picks)
  on one fixed normalised batch already in memory, as many steps as an epoch has batches;
  images/s;
- real loop: `trainables.train.fit` (epochs=--epochs, 1 thread) with a report callback; the
  data_wait_share (share of training time blocked on the next batch) of epochs 2..E.

The loader/step ratio should be >> 1 and the wait share <= 5 %. --quick: 2 epochs, 1 repeat,
32 px, batch 32, the first 20 photos of each class.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import autocast, header, mean_std, parse_epoch_args, require_signs
from benchmarks.overhead import subset_folder


def load(source: Path, image_size: int, per_class: int | None):
    """The data (the first `per_class` photos of each class with --quick) and its split."""
    from trainables.data import load_data
    from trainables.split import draw_split

    with tempfile.TemporaryDirectory() as tmp:
        folder = subset_folder(source, Path(tmp), per_class) if per_class else source
        data = load_data(folder, image_size=image_size)
    split = draw_split(data.labels, val_fraction=0.15, test_fraction=0.15, seed=0,
                       predefined=data.splits, class_names=data.class_names)
    return data, split


def loader_rate(data, train: np.ndarray, batch_size: int, passes: int, seed: int) -> float:
    """Images/s of the training batch iterator alone."""
    from trainables.augment import train_batches, train_transform

    transform = train_transform("light", data.images.shape[1], seed=seed)
    rng = np.random.default_rng(seed)
    seen, start = 0, time.perf_counter()
    for _ in range(passes):
        for x, _y in train_batches(data.images, data.labels, rng.permutation(train),
                                   batch_size=batch_size, transform=transform):
            seen += len(x)
    return seen / (time.perf_counter() - start)


def step_rate(data, batch_size: int, steps: int, mean: list[float], std: list[float]) -> float:
    """Images/s of resnet10t training steps on one batch held in memory (after 2 warm-up)."""
    import torch

    from trainables.augment import normalize
    from trainables.models import create_model, initial_state
    from trainables.train import amp_dtype

    torch.set_num_threads(1)
    model = create_model("resnet10t", data.num_classes)
    model.load_state_dict(initial_state("resnet10t", data.num_classes, seed=0))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=1e-4)
    n = min(batch_size, len(data.labels))
    x = normalize(torch.from_numpy(data.images[:n]).permute(0, 3, 1, 2).contiguous(),
                  torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1))
    y = torch.from_numpy(data.labels[:n])
    amp = amp_dtype("auto", torch.device("cpu"))
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return n * steps / (time.perf_counter() - start)


def real_loop(data, split, args: argparse.Namespace, mean: list[float], std: list[float],
              seed: int) -> list[dict]:
    """`fit` as a trial runs it, without Ray; the metrics of every epoch."""
    from trainables.models import initial_state
    from trainables.train import TrainConfig, TrialInputs, fit

    cfg = TrainConfig(model="resnet10t", lr=0.003, batch_size=args.batch_size,
                      epochs=args.epochs, augment="light", seed=seed, threads=1)
    inputs = TrialInputs(data=data, init_state=initial_state("resnet10t", data.num_classes,
                                                             seed=0),
                         train_idx=split.train, val_idx=split.val, mean=mean, std=std)
    got: list[dict] = []
    fit(cfg, inputs, None, report=got.append)
    return got


def main(argv: list[str] | None = None) -> None:
    args, per_class = parse_epoch_args(__doc__, argv, epochs=3)
    print(header("data path (sign-language photos, 'light' augmentation, resnet10t 1 thread)",
                 args.repeats, f"{args.epochs} epochs, batch {args.batch_size}, "
                 f"{args.image_size} px, autocast {autocast()}"
                 + (f", first {per_class} photos/class" if per_class else "")), flush=True)
    from trainables.models import create_model, normalization

    data, split = load(Path(args.data) if args.data else require_signs(), args.image_size,
                       per_class)
    mean, std = normalization(create_model("resnet10t", data.num_classes))
    steps = max(3, len(split.train) // args.batch_size)
    print(f"{len(split.train)} training images; {steps} model steps per repeat", flush=True)
    rows: list[dict[str, float]] = []
    for rep in range(args.repeats):
        loader = loader_rate(data, split.train, args.batch_size, args.epochs, seed=rep)
        step = step_rate(data, args.batch_size, steps, mean, std)
        epochs = real_loop(data, split, args, mean, std, seed=rep)[1:]
        rows.append({"loader": loader, "step": step, "ratio": loader / step,
                     "wait": float(np.mean([m["data_wait_share"] for m in epochs])),
                     "fit": float(np.mean([m["train_images_per_s"] for m in epochs]))})
        r = rows[-1]
        print(f"repeat {rep}: loader {r['loader']:.0f} img/s, model step {r['step']:.0f} img/s, "
              f"fit trains {r['fit']:.0f} img/s, data wait "
              + ", ".join(f"{m['data_wait_share']:.1%}" for m in epochs), flush=True)
    print(f"\nloader {mean_std([r['loader'] for r in rows])} img/s; model step "
          f"{mean_std([r['step'] for r in rows])} img/s; fit training "
          f"{mean_std([r['fit'] for r in rows])} img/s")
    print(f"ratio loader/step {mean_std([r['ratio'] for r in rows])} (should be >> 1); "
          f"data_wait_share epochs 2..{args.epochs} {mean_std([r['wait'] for r in rows])} "
          "(goal <= 0.05)", flush=True)


if __name__ == "__main__":
    main()
