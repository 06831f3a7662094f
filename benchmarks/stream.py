"""Data larger than memory: is streaming from the decoded cache as fast as memory, the same run,
and does decoding spread over a cluster?

    python -m benchmarks.stream [--data DIR ...] [--image-size 64] [--epochs 3] [--repeats 2]
                                [--quick]

Per dataset (default: the sign photos and clothing-small, decoded at --image-size), in this
process without Ray unless said:

- training: `trainables.train.fit` as a trial runs it (the recommended recipe's settings, every
  CPU as threads, --epochs epochs on the train split of the search's split, val every epoch), once
  from the in-memory array and once from the decoded cache (`trainables.cache.DiskImages`, a read
  per batch), the order alternating between repeats; training images/s per trial over epochs
  2..E, their ratio (streamed / in memory: should be >= 0.9) and whether the val accuracy of
  every epoch is the same (the bytes are the same, so it should be identical, not within a
  spread);
- decode: images/s per CPU core of the stream path's decoder (`decode_rows`, one thread);
- cluster (the largest dataset, each file three times): decoding into the cache over a local Ray
  cluster (`ray.cluster_utils.Cluster`) of one node with one CPU, then of two such nodes (workers
  warmed up first); images/s and the ratio two / one, beside what this machine allows at all: the
  same decoding on two threads of this process against one, without Ray.

--quick: 1 repeat, 2 epochs, 32 px, the first 20 sign photos of each class, no cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, header, mean_std, require_signs
from benchmarks.overhead import subset_folder

CLOTHING = REPO.parent / "shared" / "data" / "clothing-small"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", type=Path, default=None)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--parts", nargs="+", default=["training", "decode", "cluster"],
                   choices=("training", "decode", "cluster"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs, args.image_size = 1, 2, 32
    sources = args.data or [require_signs()] + (
        [CLOTHING] if CLOTHING.is_dir() and not args.quick else [])
    print(header("stream", args.repeats, f"{args.image_size} px, {args.epochs} epochs"),
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    try:
        largest = None
        for source in sources:
            folder = subset_folder(source, work / f"sub-{source.name}", 20) if args.quick \
                else source
            files = dataset_files(folder)
            largest = max(largest or files, files, key=len)
            print(f"\n## {source.name}: {len(files)} images", flush=True)
            if "training" in args.parts:
                training(folder, args, work / f"cache-{source.name}")
            if "decode" in args.parts:
                decoding(files, args.image_size, work / f"rows-{source.name}")
        if not args.quick and "cluster" in args.parts:
            cluster(largest * 3, args.image_size, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def dataset_files(folder: Path) -> list[Path]:
    from trainables.data import class_files, split_folders

    parts = split_folders(folder) or {"all": folder}
    return [f for d in parts.values() for _, f in class_files(d)]


def training(folder: Path, args, cache_root: Path) -> None:
    from trainables.cache import Decoding
    from trainables.config import TrainConfig
    from trainables.data import load_data
    from trainables.defaults import RECOMMENDED
    from trainables.inputs import TrialInputs
    from trainables.models import initial_state
    from trainables.split import draw_split

    in_memory = load_data(folder, image_size=args.image_size)
    on_disk = load_data(folder, image_size=args.image_size,
                        decoding=Decoding("stream", cache_root))
    split = draw_split(in_memory.labels, val_fraction=0.15, test_fraction=0.15, seed=0,
                       predefined=in_memory.splits, class_names=in_memory.class_names)
    init = initial_state("resnet10t", in_memory.num_classes, seed=0)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in RECOMMENDED.items() if k in known and k != "epochs"})
    cfg = dataclasses.replace(cfg, epochs=args.epochs, threads=os.cpu_count() or 1, keep_last=0)
    rates: dict[str, list[float]] = {"memory": [], "stream": []}
    accs: dict[str, list[list[float]]] = {"memory": [], "stream": []}
    for r in range(args.repeats):
        for name in (("memory", "stream") if r % 2 == 0 else ("stream", "memory")):
            data = in_memory if name == "memory" else on_disk
            rate, acc = one_run(cfg, TrialInputs(data=data, init_state=init,
                                                 train_idx=split.train, val_idx=split.val))
            rates[name].append(rate)
            accs[name].append(acc)
    ratio = [s / m for s, m in zip(rates["stream"], rates["memory"])]
    print(f"training images/s per trial: in memory {mean_std(rates['memory'])}, streamed "
          f"{mean_std(rates['stream'])}; ratio streamed/memory {mean_std(ratio)}", flush=True)
    same = all(a == b for a, b in zip(accs["memory"], accs["stream"]))
    print(f"val accuracy per epoch: in memory {accs['memory'][0]}, streamed {accs['stream'][0]}"
          f" -> {'identical' if same else 'DIFFERENT'} in every repeat" if same else
          f" -> DIFFERENT: {accs}", flush=True)


def one_run(cfg, inputs) -> tuple[float, list[float]]:
    from trainables.train import fit

    reports: list[dict] = []
    fit(cfg, inputs, None, report=reports.append)
    steady = reports[1:] or reports
    return (float(np.mean([r["train_images_per_s"] for r in steady])),
            [round(r["val_acc"], 6) for r in reports])


def decoding(files: list[Path], image_size: int, root: Path) -> None:
    from trainables.cache import decode_rows
    from trainables.data import decode_image

    path = make_rows(root, len(files), image_size)
    tick = time.perf_counter()
    decode_rows(str(path), offset_of(path), 0, [str(f) for f in files], image_size, decode_image)
    took = time.perf_counter() - tick
    print(f"decode: {len(files) / took:.0f} images/s per CPU core (one thread, {len(files)} "
          f"images at {image_size} px)", flush=True)


def make_rows(root: Path, n: int, image_size: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "images.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                              shape=(n, image_size, image_size, 3))
    return path


def offset_of(path: Path) -> int:
    return int(np.load(path, mmap_mode="r").offset)


def cluster(files: list[Path], image_size: int, work: Path) -> None:
    """Decoding over a local cluster of one, then two one-CPU nodes."""
    import ray
    from ray.cluster_utils import Cluster

    from trainables.cache import decode_rows, decode_rows_everywhere
    from trainables.data import decode_image

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    rates = []
    try:
        for nodes in (1, 2):
            if nodes == 2:
                c.add_node(num_cpus=1)
                c.wait_for_nodes()
            if not ray.is_initialized():
                ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
            warm = make_rows(work / f"warm-{nodes}", 64, image_size)  # start every worker
            decode_rows_everywhere(str(warm), offset_of(warm), files[:64], image_size,
                                   decode_image)
            path = make_rows(work / f"cluster-{nodes}", len(files), image_size)
            tick = time.perf_counter()
            _, cpus = decode_rows_everywhere(str(path), offset_of(path), files, image_size,
                                             decode_image)
            rates.append(len(files) / (time.perf_counter() - tick))
            print(f"cluster decode: {nodes} node(s), {cpus} CPU(s): {rates[-1]:.0f} images/s",
                  flush=True)
    finally:
        ray.shutdown()
        c.shutdown()
    local = []
    for threads in (1, 2):
        path = make_rows(work / f"local-{threads}", len(files), image_size)
        tick = time.perf_counter()
        part = (len(files) + threads - 1) // threads
        jobs = [(str(path), offset_of(path), s, [str(f) for f in files[s:s + part]], image_size,
                 decode_image) for s in range(0, len(files), part)]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda job: decode_rows(*job), jobs))
        local.append(len(files) / (time.perf_counter() - tick))
    print(f"cluster decode ratio two nodes / one: {rates[1] / rates[0]:.2f} (this machine "
          f"without Ray, two threads / one: {local[1] / local[0]:.2f}, {local[0]:.0f} -> "
          f"{local[1]:.0f} images/s)", flush=True)


if __name__ == "__main__":
    main()
