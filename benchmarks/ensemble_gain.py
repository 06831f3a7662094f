"""Ensemble gain by shared start: every ensemble row against the best single model, per --init.

    python -m benchmarks.ensemble_gain [--init warm random] [--seeds 0 1 2] [--num-samples 8]
        [--budget 8m] [--top 5] [--retrain-seeds 0] [--keep-last K] [--warm-epochs N]
        [--keep DIR]

For each search seed and each --init mode, in one run: `search.run` on the sign-language photos
(or --data) with the same --time-budget for every mode (so a warm start's time is paid out of the
same wall time as the random start's extra trial time), then `ensemble.build --top K`. Prints
every row of each report, the warm start's seconds, how many ingredients the greedy soup took
(trials and last-epoch snapshots apart), and mean +- std over the search seeds per mode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO, add_search_args, header, mean_std, resolve_data, work_dir

ROWS = ("best single", "hard vote", "soft vote", "weighted vote", "uniform soup", "greedy soup",
        "last-epochs soup")


def run_one(seed: int, init: str, work: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    name = f"gain-{init}-{seed}"
    common = ["--experiment", name, "--storage", str(work / "runs")]
    search = subprocess.run(
        [sys.executable, "-m", "search.run", "--data", str(args.data), "--seed", str(seed),
         "--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs),
         "--image-size", str(args.image_size), "--init", init, "--time-budget", args.budget,
         *(["--keep-last", str(args.keep_last)] if args.keep_last is not None else []),
         "--no-refit",
         *(["--warm-epochs", str(args.warm_epochs)] if args.warm_epochs and init == "warm"
           else []),
         "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", *common],
        cwd=work, env=env, capture_output=True, text=True, check=False)
    if search.returncode:
        raise SystemExit(f"search.run failed:\n{search.stderr[-3000:]}")
    build = subprocess.run([sys.executable, "-m", "ensemble.build", "--top", str(args.top),
                            "--seeds", str(args.retrain_seeds), *common], cwd=work, env=env,
                           capture_output=True, text=True, check=False)
    if build.returncode:
        raise SystemExit(f"ensemble.build failed:\n{build.stderr[-3000:]}")
    exp = work / "runs" / name
    report = json.loads((exp / "ensemble" / "report.json").read_text())
    summary = json.loads((exp / "summary.json").read_text())
    return {r["name"]: r for r in report["rows"]} | {
        "_chosen": report["chosen"], "_start": summary.get("start", {}),
        "_trials": sum(summary["trials"].values()), "_wall": summary["wall_s"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_search_args(p)
    p.add_argument("--init", nargs="+", default=["warm", "random"],
                   choices=("warm", "random", "pretrained"))
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--max-epochs", type=int, default=6)
    p.add_argument("--budget", default="8m", help="--time-budget of every search")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--retrain-seeds", type=int, default=0)
    p.add_argument("--keep-last", type=int, default=None,
                   help="epochs each trial keeps for soups (default: the product's)")
    p.add_argument("--warm-epochs", type=int, default=None,
                   help="epochs of the warm start (default: the product's, a share of the trials')")
    args = p.parse_args(argv)
    print(header(f"ensemble gain ({resolve_data(args)})", len(args.seeds),
                 f"init {'/'.join(args.init)}, {args.num_samples} trials/search, budget "
                 f"{args.budget}, top {args.top}, {args.retrain_seeds} seed retrain(s), "
                 f"warm epochs {args.warm_epochs or 'default'}, keep last "
                 f"{'default' if args.keep_last is None else args.keep_last}, "
                 f"{args.image_size} px"), flush=True)
    results: dict[str, list[dict]] = {init: [] for init in args.init}
    with work_dir(args) as tmp:
        for seed in args.seeds:
            for init in args.init:
                rows = run_one(seed, init, Path(tmp), args)
                results[init].append(rows)
                start = rows["_start"]
                print(f"seed {seed}, init {init}: " + ", ".join(
                    f"{n} {rows[n]['test']['accuracy']:.4f}" for n in ROWS
                    if not math.isnan(rows[n]["test"]["accuracy"]))
                    + f" | greedy soup took {_ingredients(rows['greedy soup']['members'])} "
                    f"({rows['greedy soup']['note']}) | chosen on val: {rows['_chosen']} | "
                    f"{rows['_trials']} trials, {rows['_wall']:.0f} s"
                    + (f", warm start {start.get('seconds')} s (val "
                       f"{start.get('val_acc', float('nan')):.4f})" if init == "warm" else ""),
                    flush=True)
    for init, got_all in results.items():
        _table(init, got_all)


def _ingredients(members: list[str]) -> str:
    """How many ingredients, and how many of them are trials rather than a trial's last-epoch
    snapshots (named `<trial>-epoch_<n>`, from --keep-last)."""
    snapshots = sum("-epoch_" in m for m in members)
    return f"{len(members)} ({len(members) - snapshots} trial(s), {snapshots} snapshot(s))"


def _table(init: str, results: list[dict]) -> None:
    print(f"\n### init {init}\n")
    print("| combiner | val acc | test acc | test - best single | test NLL | test ECE | "
          "members | ms/img |")
    print("|---|---|---|---|---|---|---|---|")
    for n in ROWS:
        got = [(r[n], r["best single"]) for r in results
               if not math.isnan(r[n]["test"]["accuracy"])]
        if not got:
            print(f"| {n} | skipped | | | | | | |")
            continue
        rows = [g for g, _ in got]
        print(f"| {n} | {mean_std([g['val']['accuracy'] for g in rows])} | "
              f"{mean_std([g['test']['accuracy'] for g in rows])} | "
              f"{mean_std([g['test']['accuracy'] - b['test']['accuracy'] for g, b in got])} | "
              f"{mean_std([g['test']['loss'] for g in rows])} | "
              f"{mean_std([g['test']['ece'] for g in rows])} | "
              f"{mean_std([len(g['members']) for g in rows])} | "
              f"{mean_std([g['ms_per_image'] for g in rows])} |")


if __name__ == "__main__":
    main()
