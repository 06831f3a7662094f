"""Ensemble gain: test accuracy of best single, weighted vote and greedy soup over search seeds.

    python -m benchmarks.ensemble_gain [--seeds 0 1 2] [--num-samples 8] [--retrain-seeds 1]

For each search seed: `search.run` on the sign-language photos, then `ensemble.build --top 5
--seeds 1`; prints every row of each report and mean ± std over the search seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, add_search_args, header, mean_std, resolve_data

ROWS = ("best single", "hard vote", "soft vote", "weighted vote", "uniform soup", "greedy soup",
        "last-epochs soup")


def run_one(seed: int, work: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    common = ["--experiment", f"gain{seed}", "--storage", str(work / "runs")]
    subprocess.run([sys.executable, "-m", "search.run", "--data", str(args.data), "--seed",
                    str(seed), "--num-samples", str(args.num_samples), "--image-size",
                    str(args.image_size), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
                    *common], cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "ensemble.build", "--top", str(args.top), "--seeds",
                    str(args.retrain_seeds), *common], cwd=work, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    report = json.loads((work / "runs" / f"gain{seed}" / "ensemble" / "report.json").read_text())
    return {r["name"]: r for r in report["rows"]} | {"_chosen": report["chosen"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_search_args(p)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--retrain-seeds", type=int, default=1)
    args = p.parse_args(argv)
    print(header(f"ensemble gain ({resolve_data(args)})", len(args.seeds),
                 f"{args.num_samples} trials/search, top {args.top}, {args.retrain_seeds} "
                 f"seed retrain(s), {args.image_size} px"), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows = run_one(seed, Path(tmp), args)
            results.append(rows)
            print(f"search seed {seed}: " + ", ".join(
                f"{n} {rows[n]['test']['accuracy']:.4f}" for n in ROWS) +
                f" | chosen on val: {rows['_chosen']}", flush=True)
    print("\n| combiner | val acc | test acc | test NLL | test ECE | params x members | ms/img |")
    print("|---|---|---|---|---|---|---|")
    for n in ROWS:
        got = [r[n] for r in results if not math.isnan(r[n]["test"]["accuracy"])]
        if not got:
            print(f"| {n} | skipped | | | | | |")
            continue
        print(f"| {n} | {mean_std([g['val']['accuracy'] for g in got])} | "
              f"{mean_std([g['test']['accuracy'] for g in got])} | "
              f"{mean_std([g['test']['loss'] for g in got])} | "
              f"{mean_std([g['test']['ece'] for g in got])} | "
              f"{got[0]['params_x_members'] / 1e6:.1f}M | "
              f"{mean_std([g['ms_per_image'] for g in got])} |")


if __name__ == "__main__":
    main()
