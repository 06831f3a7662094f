"""Data path: can the batch loader keep the model fed? Loader and model speeds, and the real loop.

    python -m benchmarks.data_path [--epochs 3] [--batch-size 64] [--image-size 64] [--repeats 3]
                                   [--workers 1 2] [--loader-only | --engines] [--quick]

On the sign-language photos (decoded once at --image-size, the search's split, seed 0), in this
process without Ray, per repeat:

- loader: the training batches of the host path (`trainables.batches`: OpenCV applies the 'light'
  policy's per-image parameters) built by --workers loader processes, persistent over --epochs
  passes of the shuffled train split (the first, which starts the workers, untimed; more passes
  where those take under 3 s), no model;
  images/s per worker count, side by side, and
  their ratio to the first count (does the loader scale with the CPUs it is given?); beside it
  OpenCV's warpAffine alone on as many threads, native code without the GIL, whose ratio is what
  the machine's cores allow at all, and albumentations' per-image pipeline (the loader of
  earlier versions) on one thread;
- model step: forward + backward + AdamW step of resnet10t (1 thread, autocast as 'auto' picks)
  on one fixed normalised batch already in memory, as many steps as an epoch has batches;
  images/s;
- real loop: `trainables.train.fit` (epochs=--epochs, 1 thread) with a report callback; the
  data_wait_share (share of training time blocked on the next batch) of epochs 2..E.

--engines compares, instead of all that, the two ways a batch is augmented on the CPU, in the
training process: OpenCV image by image (the CPU default) and the batched tensor kernels the GPU
path runs (`--augment-device cuda`'s engine, here on the CPU), on --workers as threads (torch's
and OpenCV's);
images/s of finished batches (augmented, normalised float), side by side.

--loader-only skips the model step and the real loop (e.g. at --image-size 224, where a CPU
trains slowly). The loader/step ratio should be >> 1 and the wait share <= 5 %. --quick: 2 epochs,
1 repeat, 32 px, batch 32, the first 20 photos of each class.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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


def _light_batches(data, train: np.ndarray, batch_size: int, seed: int, *, workers: int = 0,
                   tensor: bool = False):
    """The host's (or with `tensor`, the resident tensor path's) 'light' training batches of
    the train split on the CPU, shuffled per pass from `seed`."""
    import torch

    from trainables.batch_augment import batch_transform
    from trainables.batches import TrainBatches

    return TrainBatches(data.images, data.labels, batch_size=batch_size,
                        n_batches=max(1, len(train) // batch_size), device=torch.device("cpu"),
                        order_of=lambda e: np.random.default_rng([seed, e]).permutation(train),
                        seed_of=lambda e: seed * 100 + e, mean=torch.zeros(1, 3, 1, 1),
                        std=torch.ones(1, 3, 1, 1), channels_last=False,
                        augment=batch_transform("light"), tensor_augment=tensor,
                        resident=tensor, workers=workers, prefetch=2)


def _passes_rate(one_pass, passes: int, min_seconds: float) -> float:
    """Images/s over `passes` passes after the first (which starts loader workers: timed only
    when it is the only one) or, when that is quicker, as many as fill `min_seconds`.
    `one_pass(p)` yields pass p's batches."""
    seen, start, p = 0, time.perf_counter(), 0
    while p < passes or (p > 1 and time.perf_counter() - start < min_seconds):
        if p == 1:
            seen, start = 0, time.perf_counter()
        for batch in one_pass(p):
            seen += len(batch[0])
        p += 1
    return seen / (time.perf_counter() - start)


def loader_rate(data, train: np.ndarray, batch_size: int, passes: int, seed: int,
                workers: int = 1, min_seconds: float = 3.0) -> float:
    """Images/s of the host loader alone: `workers` processes building 'light' batches, over
    `passes` passes after the first or, when that is quicker, as many as fill `min_seconds`
    (a pass of the sign photos takes a tenth of a second at 64 px: too short to time)."""
    batches = _light_batches(data, train, batch_size, seed, workers=workers)
    try:  # uint8 batches as the workers hand them over
        return _passes_rate(batches.host_epoch, passes, min_seconds)
    finally:
        batches.close()


def engine_rate(data, train: np.ndarray, batch_size: int, seed: int, *, tensor: bool,
                threads: int, min_seconds: float = 3.0) -> float:
    """Images/s of finished training batches built in the training process on the CPU, by
    OpenCV image by image (`tensor=False`) or by the batched tensor kernels on `threads` torch
    threads (OpenCV on as many threads), over whole passes of the shuffled train split (the
    first untimed)."""
    import cv2
    import torch

    before = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    batches = _light_batches(data, train, batch_size, seed, tensor=tensor)
    try:
        return _passes_rate(batches.epoch, 2, min_seconds)
    finally:
        batches.close()
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


def engines(data, split, args: argparse.Namespace, min_seconds: float) -> None:
    """OpenCV against the tensor kernels on the CPU, per thread count, side by side per repeat."""
    rows = []
    for rep in range(args.repeats):
        row = {(tensor, t): engine_rate(data, split.train, args.batch_size, rep, tensor=tensor,
                                        threads=t, min_seconds=min_seconds)
               for t in args.workers for tensor in (False, True)}
        rows.append(row)
        print(f"repeat {rep}: " + "; ".join(
            f"{t} thread(s): OpenCV {row[False, t]:.0f}, tensor kernels {row[True, t]:.0f} img/s"
            for t in args.workers), flush=True)
    for t in args.workers:
        print(f"{t} thread(s): OpenCV {mean_std([r[False, t] for r in rows])} img/s, tensor "
              f"kernels {mean_std([r[True, t] for r in rows])} img/s; tensor / OpenCV "
              f"{mean_std([r[True, t] / r[False, t] for r in rows])} (> 1: the tensor kernels "
              "should be the CPU default)", flush=True)


def albumentations_rate(data, train: np.ndarray, seconds: float = 2.0) -> float:
    """Images/s of albumentations' 'light' pipeline, image by image on one thread."""
    from trainables.augment import train_transform

    transform = train_transform("light", data.images.shape[1], seed=0)
    seen, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in train[:256]:
            transform(image=data.images[i])
        seen += min(256, len(train))
    return seen / (time.perf_counter() - start)


def native_rate(image_size: int, threads: int) -> float:
    """Images/s of OpenCV's warpAffine alone on `threads` threads: native code that holds no GIL,
    so its scaling is the most any thread count can get from this machine's cores."""
    import cv2

    cv2.setNumThreads(1)
    img = np.zeros((image_size, image_size, 3), np.uint8)
    m = np.float32([[0.98, 0.17, 2.0], [-0.17, 0.98, 3.0]])
    per_thread = max(1, int(2e8 / image_size**2) // threads)

    def work(n: int) -> None:
        for _ in range(n):
            cv2.warpAffine(img, m, (image_size, image_size))

    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(work, [per_thread] * threads))
        return per_thread * threads / (time.perf_counter() - start)


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
    from trainables.inputs import TrialInputs
    from trainables.models import initial_state
    from trainables.train import TrainConfig, fit

    cfg = TrainConfig(model="resnet10t", lr=0.003, batch_size=args.batch_size,
                      epochs=args.epochs, augment="light", seed=seed, threads=1)
    inputs = TrialInputs(data=data, init_state=initial_state("resnet10t", data.num_classes,
                                                             seed=0),
                         train_idx=split.train, val_idx=split.val, mean=mean, std=std)
    got: list[dict] = []
    fit(cfg, inputs, None, report=got.append)
    return got


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, int | None]:
    """The epoch benchmarks' options plus the loader worker sweep."""
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                       help="loader processes to compare (with --engines: torch threads)")
    only = extra.add_mutually_exclusive_group()
    only.add_argument("--loader-only", action="store_true",
                      help="the loader alone: no model step, no real loop")
    only.add_argument("--engines", action="store_true",
                      help="only OpenCV against the tensor kernels on the CPU (--workers: threads)")
    return parse_epoch_args(__doc__, argv, epochs=3, parents=(extra,))


def one_repeat(data, split, args: argparse.Namespace, mean: list[float], std: list[float],
               steps: int, rep: int) -> dict[str, float]:
    """Loader images/s per worker count; unless --loader-only, model step and real loop too."""
    row = {f"loader_{w}": loader_rate(data, split.train, args.batch_size, args.epochs, seed=rep,
                                      workers=w) for w in args.workers}
    row |= {f"native_{w}": native_rate(data.images.shape[1], w) for w in args.workers}
    row["albumentations"] = albumentations_rate(data, split.train)
    line = ", ".join(f"{w} worker(s) {row[f'loader_{w}']:.0f}" for w in args.workers)
    line += "; warpAffine alone " + ", ".join(f"{w} thread(s) {row[f'native_{w}']:.0f}"
                                              for w in args.workers)
    line += f"; albumentations per image, 1 thread {row['albumentations']:.0f}"
    if not args.loader_only:
        step = step_rate(data, args.batch_size, steps, mean, std)
        epochs = real_loop(data, split, args, mean, std, seed=rep)[1:]
        row |= {"step": step, "ratio": row[f"loader_{args.workers[0]}"] / step,
                "wait": float(np.mean([m["data_wait_share"] for m in epochs])),
                "fit": float(np.mean([m["train_images_per_s"] for m in epochs]))}
        line += (f"; model step {step:.0f} img/s, fit trains {row['fit']:.0f} img/s, data wait "
                 + ", ".join(f"{m['data_wait_share']:.1%}" for m in epochs))
    print(f"repeat {rep}: loader img/s {line}", flush=True)
    return row


def summarize(rows: list[dict[str, float]], args: argparse.Namespace) -> None:
    """Mean ± std over repeats; worker ratios are taken within each repeat, side by side."""
    first = args.workers[0]
    for w in args.workers:
        line = f"loader {w} worker(s) {mean_std([r[f'loader_{w}'] for r in rows])} img/s"
        if w != first:
            ratios = [r[f"loader_{w}"] / r[f"loader_{first}"] for r in rows]
            native = [r[f"native_{w}"] / r[f"native_{first}"] for r in rows]
            line += (f"; ratio loader {w}/{first} workers {mean_std(ratios)} (goal >= 1.6 for "
                     f"2/1); warpAffine alone {w}/{first} threads {mean_std(native)} (what the "
                     "cores allow)")
        print(line, flush=True)
    alb = [r["albumentations"] for r in rows]
    one = [r[f"loader_{first}"] / a for r, a in zip(rows, alb)]
    print(f"albumentations per image (1 thread) {mean_std(alb)} img/s; our loader with {first} "
          f"worker(s) / albumentations {mean_std(one)}", flush=True)
    if args.loader_only:
        return
    print(f"model step {mean_std([r['step'] for r in rows])} img/s; fit training "
          f"{mean_std([r['fit'] for r in rows])} img/s")
    print(f"ratio loader/step {mean_std([r['ratio'] for r in rows])} (should be >> 1); "
          f"data_wait_share epochs 2..{args.epochs} {mean_std([r['wait'] for r in rows])} "
          "(goal <= 0.05)", flush=True)


def main(argv: list[str] | None = None) -> None:
    args, per_class = parse_args(argv)
    subset = f", first {per_class} photos/class" if per_class else ""
    if args.engines:
        print(header("augmentation engines on the CPU (sign-language photos, 'light')",
                     args.repeats, f"batch {args.batch_size}, {args.image_size} px, threads "
                     f"{args.workers}{subset}"), flush=True)
    else:
        what = "loader" if args.loader_only else "resnet10t 1 thread"
        print(header(f"data path (sign-language photos, 'light' augmentation, {what})",
                     args.repeats, f"{args.epochs} epochs, batch {args.batch_size}, "
                     f"{args.image_size} px, loader workers {args.workers}, autocast "
                     f"{autocast()}{subset}"), flush=True)
    from trainables.models import create_model, normalization

    data, split = load(Path(args.data) if args.data else require_signs(), args.image_size,
                       per_class)
    if args.engines:
        print(f"{len(split.train)} training images; finished batches built in the training "
              "process", flush=True)
        engines(data, split, args, min_seconds=0.3 if per_class else 3.0)
        return
    mean, std = normalization(create_model("resnet10t", data.num_classes))
    steps = max(3, len(split.train) // args.batch_size)
    print(f"{len(split.train)} training images"
          + ("" if args.loader_only else f"; {steps} model steps per repeat"), flush=True)
    rows = [one_repeat(data, split, args, mean, std, steps, rep) for rep in range(args.repeats)]
    summarize(rows, args)


if __name__ == "__main__":
    main()
