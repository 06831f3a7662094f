"""Search overhead: images/s of one trial run through the search versus a bare PyTorch loop.

    python -m benchmarks.overhead [--epochs 4] [--batch-size 64] [--image-size 64] [--repeats 3]
                                  [--quick]

Every measured thing runs in a fresh process, one after the other, on the sign-language photos
(decoded once at --image-size, split with draw_split seed 0 as the search does), resnet10t from
the search's shared initial state, 1 thread per worker, albumentations 'light', same
normalisation and the same autocast dtype ('auto'):

- ours inline: `python -m search.run` with one trial, fixed hyperparameters, --num-cpus 1,
  from the same random initial state as the bare loop (--init random) and without the refit
  (neither is part of a trial's epochs);
- ours DDP: the same with --workers-per-trial 2 --num-cpus 2 (Ray Train, 2 workers);
- bare: a plain loop (AdamW, constant lr) over shuffled batches built by the same prefetching
  albumentations per image in one background thread (a script's DataLoader with one worker),
  then an evaluation of the val split each epoch;
- bare plain: the same loop building each batch in the main thread (no prefetch), for context.

Images/s of an epoch = images trained / the epoch's whole wall time (train + eval, and for ours
also metrics, report and checkpoint: Tune's time_this_iter_s), over epochs 2..E (epoch 1 warms
up). The ratios are taken per repeat. Ray Train polls its workers every 2 s
(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) and a worker's report waits while its previous one is unread,
so DDP epochs shorter than ~2 s are stretched to that: then ours_ddp measures the poll.
--quick: 2 epochs, 1 repeat, 32 px, batch 32, the first 20 photos of each class (symlinked into
a temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, autocast, header, mean_std, parse_epoch_args, require_signs

PATHS = ("ours_inline", "ours_ddp", "bare", "bare_plain")
FIXED = {"lr": 0.003, "scheduler": "cosine", "dropout": 0.0, "weight_decay": 0.0001}


def subset_folder(src: Path, dst: Path, per_class: int) -> Path:
    """An ImageFolder of the first `per_class` files of each class of `src`, as symlinks."""
    from trainables.data import IMAGE_SUFFIXES

    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / d.name).mkdir(parents=True, exist_ok=True)
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for f in files[:per_class]:
            (dst / d.name / f.name).symlink_to(f.resolve())
    return dst


def prepare(data_dir: Path, image_size: int, out: Path) -> int:
    """Decodes the data and draws the search's split once; saves both for the bare loops."""
    from trainables.data import load_data
    from trainables.split import draw_split

    data = load_data(data_dir, image_size=image_size)
    split = draw_split(data.labels, val_fraction=0.15, test_fraction=0.15, seed=0,
                       predefined=data.splits, class_names=data.class_names)
    np.savez(out, images=data.images, labels=data.labels, train=split.train, val=split.val,
             num_classes=data.num_classes)
    return len(split.train)


def trained_per_epoch(n_train: int, batch_size: int, world: int) -> int:
    """Images one epoch of `fit` trains on: DistributedSampler pads, full batches only."""
    per_rank = -(-n_train // world)
    batches = max(1, per_rank // batch_size)
    return min(per_rank, batches * batch_size) * world


def run_ours(args: argparse.Namespace, data_dir: Path, work: Path, name: str,
             workers: int, n_train: int) -> dict[str, float]:
    """One single-trial search in a subprocess; rates from its trial's result.json."""
    cmd = [sys.executable, "-m", "search.run", "--data", str(data_dir), "--num-samples", "1",
           "--max-epochs", str(args.epochs), "--early-stopping", "none",
           "--space", f"epochs={args.epochs}", "--space", f"batch_size={args.batch_size}",
           *[a for k, v in FIXED.items() for a in ("--space", f"{k}={v}")],
           "--image-size", str(args.image_size), "--num-cpus", str(max(1, workers)),
           "--init", "random", "--no-refit", "--experiment", name, "--storage", str(work / "runs"),
           "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    if workers > 1:
        cmd += ["--workers-per-trial", str(workers)]
    proc = subprocess.run(cmd, cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"search {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    (result,) = (work / "runs" / name / "ray").glob("trial_*/result.json")
    rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    later = [r for r in rows if r["training_iteration"] >= 2]
    images = trained_per_epoch(n_train, args.batch_size, workers)
    return rates(images, [r["time_this_iter_s"] for r in later],
                 [images / r["train_images_per_s"] for r in later])


def rates(images: int, epoch_s: list[float], train_s: list[float]) -> dict[str, float]:
    """Images/s over whole epochs and over their training parts, epochs pooled."""
    return {"img_s": images * len(epoch_s) / sum(epoch_s),
            "train_img_s": images * len(train_s) / sum(train_s),
            "other_share": 1 - sum(train_s) / sum(epoch_s)}


def run_bare(args: argparse.Namespace, npz: Path, prefetch: bool) -> dict[str, float]:
    """`bare_loop` in a fresh process; its last stdout line is a JSON list of epochs."""
    spec = {"npz": str(npz), "epochs": args.epochs, "batch_size": args.batch_size,
            "prefetch": prefetch}
    code = f"from benchmarks.overhead import bare_loop; bare_loop({json.dumps(spec)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=False, env={**os.environ, "PYTHONPATH": str(REPO),
                                          "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"bare loop failed:\n{proc.stderr[-3000:]}")
    epochs = json.loads(proc.stdout.strip().splitlines()[-1])[1:]
    (images,) = {e["images"] for e in epochs}
    return rates(images, [e["epoch_s"] for e in epochs], [e["train_s"] for e in epochs])


def bare_loop(spec_json: str) -> None:
    """A plain PyTorch train + eval loop; prints one JSON list of per-epoch timings."""
    import torch

    from trainables.augment import train_transform
    from trainables.models import create_model, initial_state, normalization
    from trainables.train import amp_dtype

    spec = json.loads(spec_json)
    torch.set_num_threads(1)
    z = np.load(spec["npz"])
    images, labels, train, val = z["images"], z["labels"], z["train"], z["val"]
    model = create_model("resnet10t", int(z["num_classes"]))
    model.load_state_dict(initial_state("resnet10t", int(z["num_classes"]), seed=0))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(model))
    opt = torch.optim.AdamW(model.parameters(), lr=FIXED["lr"], weight_decay=1e-4)
    transform = train_transform("light", images.shape[1], seed=0)
    amp = amp_dtype("auto", torch.device("cpu"))
    rng = np.random.default_rng(0)
    out = []
    for _ in range(spec["epochs"]):
        order = rng.permutation(train)
        start = time.perf_counter()
        if spec["prefetch"]:
            batches = prefetched(plain_batches(images, labels, order, spec["batch_size"],
                                               transform))
        else:
            batches = plain_batches(images, labels, order, spec["batch_size"], transform)
        seen = train_epoch(model, opt, batches, mean, std, amp)
        train_s = time.perf_counter() - start
        evaluate(model, images[val], mean, std, amp)
        out.append({"images": seen, "train_s": train_s,
                    "epoch_s": time.perf_counter() - start})
    print(json.dumps(out), flush=True)


def plain_batches(images: np.ndarray, labels: np.ndarray, order: np.ndarray, batch_size: int,
                  transform):
    """Shuffled full batches, each augmented image by image in the calling thread."""
    import torch

    for s in range(0, max(1, len(order) - batch_size + 1), batch_size):
        idx = order[s:s + batch_size]
        x = np.stack([transform(image=img)["image"] for img in images[idx]])
        yield torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[idx])


def prefetched(batches, ahead: int = 2):
    """The same batches, built by one background thread up to `ahead` batches in advance (what a
    careful script does with a DataLoader and one worker)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(ahead)
    done = object()

    def fill() -> None:
        for b in batches:
            q.put(b)
        q.put(done)

    threading.Thread(target=fill, daemon=True).start()
    while (b := q.get()) is not done:
        yield b


def train_epoch(model, opt, batches, mean, std, amp) -> int:
    """One pass of forward, backward and AdamW steps; returns the images seen."""
    import torch

    model.train()
    seen = 0
    for x, y in batches:
        x = (x.float().div_(255.0) - mean) / std
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += len(x)
    return seen


def evaluate(model, images: np.ndarray, mean, std, amp, batch_size: int = 256):
    """Softmax probabilities of `images`, batched, in eval mode."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(images[s:s + batch_size]).permute(0, 3, 1, 2).float()
            x = (x.div_(255.0) - mean) / std
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                out.append(torch.softmax(model(x).float(), 1))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    args, per_class = parse_epoch_args(__doc__, argv, epochs=4)
    source = Path(args.data) if args.data else require_signs()
    print(header("search overhead (sign-language photos, resnet10t, 1 thread/worker)",
                 args.repeats, f"{args.epochs} epochs, batch {args.batch_size}, "
                 f"{args.image_size} px, autocast {autocast()}"
                 + (f", first {per_class} photos/class" if per_class else "")), flush=True)
    report(measure_all(args, source, per_class))


def measure_all(args: argparse.Namespace, source: Path, per_class: int | None
                ) -> dict[str, list[dict]]:
    """Every path once per repeat, interleaved, each in a fresh process."""
    got: dict[str, list[dict]] = {k: [] for k in PATHS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = subset_folder(source, work / "subset", per_class) if per_class else source
        n_train = prepare(data_dir, args.image_size, work / "data.npz")
        print(f"{n_train} training images, epochs 2..{args.epochs} timed", flush=True)
        for rep in range(args.repeats):
            for kind in PATHS:
                start = time.perf_counter()
                if kind.startswith("ours"):
                    workers = 2 if kind == "ours_ddp" else 1
                    r = run_ours(args, data_dir, work, f"{kind}{rep}", workers, n_train)
                else:
                    r = run_bare(args, work / "data.npz", prefetch=kind == "bare")
                got[kind].append(r)
                print(f"repeat {rep}: {kind:<11} {r['img_s']:7.1f} img/s per epoch, "
                      f"{r['train_img_s']:7.1f} img/s training only, "
                      f"{r['other_share']:.1%} of the epoch outside training "
                      f"(process took {time.perf_counter() - start:.0f} s)", flush=True)
    return got


def report(got: dict[str, list[dict]]) -> None:
    """Mean ± std over repeats per path, and the per-repeat ratios."""
    print("\n| path | img/s per epoch (epochs 2..E) | img/s training only | outside training |")
    print("|---|---|---|---|")
    for kind in PATHS:
        rs = got[kind]
        print(f"| {kind} | {mean_std([r['img_s'] for r in rs])} | "
              f"{mean_std([r['train_img_s'] for r in rs])} | "
              f"{mean_std([r['other_share'] for r in rs])} |")

    def ratio(a: str, b: str) -> str:
        return mean_std([x["img_s"] / y["img_s"] for x, y in zip(got[a], got[b])])

    print(f"\nratio ours_inline/bare {ratio('ours_inline', 'bare')} (goal >= 0.98); "
          f"ours_ddp/bare {ratio('ours_ddp', 'bare')}; "
          f"ours_inline/bare_plain {ratio('ours_inline', 'bare_plain')}", flush=True)


if __name__ == "__main__":
    main()
