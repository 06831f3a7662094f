"""The product against a fixed hand-written training script, on the same data and machine.

    python -m benchmarks.vs_script --data ../shared/data/clothing-small [--seeds 0 1 2] [--k 4]

Per seed, one after the other: the script (benchmarks/script_baseline.py: plain PyTorch, no search)
is run and timed (T); then the product gets a wall budget of K x T for everything a user would
run: `search.run --time-budget` (search, warm start, refit on train + val) followed by
`ensemble.build --top 5`. The build's time is measured and kept out of the search's budget
(`--ensemble-reserve`, a share of K x T), so the product's total stays within K x T. Prints test
accuracy, macro-F1 and seconds of the script, the search alone (its refit final model and the
val-selected trial) and search + ensemble (the row chosen on val), then mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, add_keep_arg, header, mean_std, work_dir


def run_script(data: Path, seed: int, image_size: int) -> dict:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.script_baseline", str(data),
                           "--seed", str(seed), "--image-size", str(image_size)],
                          capture_output=True, text=True, env=_env(), cwd=REPO, check=False)
    if proc.returncode:
        raise SystemExit(f"the script failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"acc": out["test_accuracy"], "f1": out["test_f1"], "s": time.time() - start}


def run_product(data: Path, seed: int, budget_s: float, args: argparse.Namespace,
                work: Path) -> dict:
    common = ["--experiment", f"vs{seed}", "--storage", str(work / "runs")]
    start = time.time()
    search = subprocess.run(
        [sys.executable, "-m", "search.run", "--data", str(data), "--seed", str(seed),
         "--image-size", str(args.image_size), "--time-budget", f"{budget_s:.0f}",
         "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", *args.search_args, *common],
        cwd=work, env=_env(), capture_output=True, text=True, check=False)
    search_s = time.time() - start
    if search.returncode:
        raise SystemExit(f"search.run failed:\n{search.stderr[-3000:]}")
    build = subprocess.run([sys.executable, "-m", "ensemble.build", "--top", str(args.top),
                            *common], cwd=work, env=_env(), capture_output=True, text=True,
                           check=False)
    total_s = time.time() - start
    if build.returncode:
        raise SystemExit(f"ensemble.build failed:\n{build.stderr[-3000:]}")
    exp = work / "runs" / f"vs{seed}"
    summary = json.loads((exp / "summary.json").read_text())
    report = json.loads((exp / "ensemble" / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    chosen = rows[report["chosen"]]
    return {"final": summary["final"]["test"], "trial": summary["test"],
            "ensemble": chosen["test"], "chosen": report["chosen"], "rows": rows,
            "search_s": search_s, "total_s": total_s, "plan": summary.get("budget"),
            "trials": summary["trials"], "start": summary.get("start")}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True,
                   help="a folder with train/ and test/ class folders (val/ optional)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=float, default=4.0, help="the product's budget in script times")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--top", type=int, default=5)
    add_keep_arg(p)
    p.add_argument("--ensemble-reserve", type=float, default=0.06,
                   help="share of K x T kept for ensemble.build (the rest is --time-budget)")
    p.add_argument("--search-args", nargs=argparse.REMAINDER, default=[],
                   help="extra search.run options, e.g. --search-args --init random")
    args = p.parse_args(argv)
    print(header(f"product vs fixed script ({args.data.name})", len(args.seeds),
                 f"K = {args.k:g}, {args.image_size} px, top {args.top}"), flush=True)
    res = []
    with work_dir(args) as tmp:
        for seed in args.seeds:
            script = run_script(args.data, seed, args.image_size)
            budget = args.k * script["s"]
            ours = run_product(args.data, seed, budget * (1 - args.ensemble_reserve), args,
                               Path(tmp))
            res.append((script, ours, budget))
            print(f"seed {seed}: script {script['acc']:.4f} / F1 {script['f1']:.4f} in "
                  f"{script['s']:.0f} s | ours refit {ours['final']['accuracy']:.4f} / "
                  f"{ours['final']['f1']:.4f}, val-selected trial {ours['trial']['accuracy']:.4f}"
                  f", + ensemble ({ours['chosen']}) {ours['ensemble']['accuracy']:.4f} / "
                  f"{ours['ensemble']['f1']:.4f}; {ours['search_s']:.0f} s search, "
                  f"{ours['total_s']:.0f} s in all (budget {budget:.0f} s); trials "
                  f"{ours['trials']}", flush=True)
            print("  rows: " + ", ".join(f"{n} {r['test']['accuracy']:.4f}"
                                         for n, r in ours["rows"].items()
                                         if r["test"]["accuracy"] == r["test"]["accuracy"]),
                  flush=True)
            if ours["plan"]:
                print(f"  plan: {ours['plan']}", flush=True)
    _table(res)


def _table(res: list) -> None:
    def col(f):
        return mean_std([f(r) for r in res])

    print("\n| | test acc | test macro-F1 | seconds | vs script acc |")
    print("|---|---|---|---|---|")
    print(f"| fixed script | {col(lambda r: r[0]['acc'])} | {col(lambda r: r[0]['f1'])} | "
          f"{col(lambda r: r[0]['s'])} | |")
    for name, key, secs in (("search (refit final model)", "final", "search_s"),
                            ("search (val-selected trial)", "trial", "search_s"),
                            ("search + ensemble.build", "ensemble", "total_s")):
        acc = [r[1][key]["accuracy"] for r in res]
        print(f"| {name} | {mean_std(acc)} | {mean_std([r[1][key]['f1'] for r in res])} | "
              f"{mean_std([r[1][secs] for r in res])} | "
              f"{mean_std([a - r[0]['acc'] for a, r in zip(acc, res)])} |")
    print(f"\nbudget K x T: {col(lambda r: r[2])} s; product total / budget: "
          f"{col(lambda r: r[1]['total_s'] / r[2])}")


if __name__ == "__main__":
    main()
