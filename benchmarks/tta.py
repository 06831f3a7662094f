"""Test errors of kept experiments' final models with and without test-time views.

    python -m benchmarks.tta RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a kept experiment folder (`benchmarks.vs_script --keep`, `benchmarks.recipes
--keep`, or any search.run experiment) with its data.npz and refit/final.pt. Per model: its test
errors on the plain images, averaged with the mirror image (`hflip`, what `--tta auto` does for
a model trained with flips), with the mirror and upside-down images, and over all eight
symmetries of the square; then the totals per kind of training.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from models.artifact import load_model
from trainables.train import predict_proba

VIEWS = {"plain": [""], "+ mirror": ["", "h"], "+ mirror, upside down": ["", "h", "v", "hv"],
         "eight symmetries": ["", "h", "v", "hv", "t", "th", "tv", "thv"]}


def view(x: np.ndarray, name: str) -> np.ndarray:
    """NHWC images transposed (t), mirrored (h), turned upside down (v), in that order."""
    if "t" in name:
        x = x.transpose(0, 2, 1, 3)
    if "h" in name:
        x = x[:, :, ::-1]
    if "v" in name:
        x = x[:, ::-1]
    return np.ascontiguousarray(x)


def errors(run: Path) -> tuple[str, str, dict[str, int]]:
    """The run's dataset, its model's kind of training, its test errors per set of views."""
    data = np.load(run / "data.npz", allow_pickle=True)
    test = data["split_test"]
    images, labels = data["images"][test], data["labels"][test]
    model, ckpt = load_model(run / "refit" / "final.pt", torch.device("cpu"))
    probs = {name: predict_proba(model, view(images, name), mean=ckpt.mean, std=ckpt.std)
             for name in VIEWS["eight symmetries"]}
    kind = ("symmetries" if ckpt.config.get("dihedral") else
            "flips" if ckpt.config.get("hflip") else "no flips")
    wrong = {k: int((sum(probs[n] for n in names).argmax(1) != labels).sum())
             for k, names in VIEWS.items()}
    return Path(str(data["source"])).name, kind, wrong


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    totals: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(VIEWS, 0))
    print("| model | trained with | " + " | ".join(VIEWS) + " |")
    print("|---|---|" + "---|" * len(VIEWS))
    for run in args.runs:
        dataset, kind, row = errors(run)
        print(f"| {run.parent.parent.name}/{run.name} | {kind} | "
              + " | ".join(str(v) for v in row.values()) + " |", flush=True)
        for k, v in row.items():
            totals[dataset, kind][k] += v
    for (dataset, kind), row in totals.items():
        print(f"| total, {dataset} | {kind} | " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
