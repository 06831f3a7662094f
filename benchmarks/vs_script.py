"""The product against a fixed hand-written training script, on the same data and machine.

    python -m benchmarks.vs_script [--data DIR ...] [--seeds 0 1 2] [--k 1 2 4]

The suite by default: clothing-small, blood-cells-small and the sign photos (split 80/20 into
train/ and test/ here, fixed). Per dataset and seed, one after the other: the script
(benchmarks/script_baseline.py: plain PyTorch, no search) is run and timed (T); then for each K
the product gets a wall budget of K x T for everything a user would run: `search.run
--time-budget` (search, warm start, refit on train + val) followed by `ensemble.build --top 5`.
The build's time is kept out of the search's budget (`--ensemble-reserve`, a share of K x T), so
the product's total stays within K x T. The product's final answer is the row ensemble.build
chooses on val (the refit is one of its rows). Prints each run, then one table per dataset and K:
mean +- std over seeds of the script's and the final answer's test accuracy, the refit's, and
the final answer's test errors relative to the script's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, SIGNS, add_keep_arg, header, mean_std, work_dir


def run_script(data: Path, seed: int, image_size: int) -> dict:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.script_baseline", str(data),
                           "--seed", str(seed), "--image-size", str(image_size)],
                          capture_output=True, text=True, env=_env(), cwd=REPO, check=False)
    if proc.returncode:
        raise SystemExit(f"the script failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"acc": out["test_accuracy"], "f1": out["test_f1"], "s": time.time() - start}


def _script(data: Path, seed: int, image_size: int, tmp: Path) -> dict:
    """The script's run for this data and seed; with --keep, a rerun reads it back rather than
    training it again (the same data, seed, image size and machine)."""
    saved = tmp / f"script-{data.name}-{seed}-{image_size}px.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    out = run_script(data, seed, image_size)
    saved.write_text(json.dumps(out))
    return out


def run_product(data: Path, seed: int, budget_s: float, args: argparse.Namespace,
                work: Path) -> dict:
    common = ["--experiment", f"vs{seed}", "--storage", str(work / "runs")]
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    search = subprocess.run(
        [sys.executable, "-m", "search.run", "--data", str(data), "--seed", str(seed),
         "--image-size", str(args.image_size), "--time-budget", f"{budget_s:.0f}",
         "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", *args.search_args, *common],
        cwd=work, env=_env(), capture_output=True, text=True, check=False)
    search_s = time.time() - start
    _save_log(work / f"search-{seed}.log", search)
    if search.returncode:
        raise RuntimeError(f"search.run failed:\n{search.stderr[-3000:]}")
    build = subprocess.run([sys.executable, "-m", "ensemble.build", "--top", str(args.top),
                            *common], cwd=work, env=_env(), capture_output=True, text=True,
                           check=False)
    total_s = time.time() - start
    _save_log(work / f"build-{seed}.log", build)
    if build.returncode:
        raise RuntimeError(f"ensemble.build failed:\n{build.stderr[-3000:]}")
    exp = work / "runs" / f"vs{seed}"
    summary = json.loads((exp / "summary.json").read_text())
    report = json.loads((exp / "ensemble" / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    refit = summary.get("refit") or {}
    return {"final": refit.get("test"), "trial": summary["test"],
            "ensemble": report["final"]["test"], "chosen": report["chosen"], "rows": rows,
            "search_s": search_s, "total_s": total_s, "plan": summary.get("budget"),
            "trials": summary["trials"], "start": summary.get("start")}


def _save_log(path: Path, proc: subprocess.CompletedProcess) -> None:
    path.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


SUITE = ("clothing-small", "blood-cells-small", "sign-language-digits")


def suite() -> list[Path]:
    """The datasets of ../shared/data the product is judged on."""
    found = [SIGNS.parents[1] / name for name in SUITE]
    missing = [str(p) for p in found if not p.is_dir()]
    if missing:
        raise SystemExit(f"needs the suite's data ({', '.join(missing)}); pass --data instead")
    return found


def with_test_split(data: Path, tmp: Path) -> Path:
    """`data` itself when it has train/ and test/ folders; else (class folders only, as the
    sign photos) a fixed stratified 80/20 train/test split of it as links in `tmp`, the same
    for every seed, so the script and the product see the same test images."""
    if (data / "train").is_dir() and (data / "test").is_dir():
        return data
    classes = [data / "images"] if (data / "images").is_dir() else [data]
    root = classes[0]
    out = tmp / f"{data.name}-split"
    rng = np.random.default_rng(0)
    for cls in sorted(d for d in root.iterdir() if d.is_dir()):
        files = sorted(f for f in cls.iterdir() if f.is_file())
        test = set(rng.choice(len(files), max(1, len(files) // 5), replace=False).tolist())
        for i, f in enumerate(files):
            dest = out / ("test" if i in test else "train") / cls.name / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                dest.symlink_to(f.resolve())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, nargs="+", default=None,
                   help="folders with train/ and test/ class folders (val/ optional), or of "
                        "class folders (split 80/20 here); default: the suite in ../shared/data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                   help="the product's budgets, in script times")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--top", type=int, default=5)
    add_keep_arg(p)
    p.add_argument("--ensemble-reserve", type=float, default=0.06,
                   help="share of K x T kept for ensemble.build (the rest is --time-budget)")
    p.add_argument("--table", nargs="+", type=Path, metavar="RUNS",
                   help="run nothing: print the table of kept runs (the runs.jsonl files of "
                        "earlier --keep folders; a later line replaces an earlier one of the "
                        "same dataset, seed and K)")
    p.add_argument("--search-args", nargs=argparse.REMAINDER, default=[],
                   help="extra search.run options, e.g. --search-args --init random")
    args = p.parse_args(argv)
    if args.table:
        _table(read_runs(args.table))
        return
    datasets = args.data or suite()
    print(header(f"product vs fixed script ({', '.join(d.name for d in datasets)})",
                 len(args.seeds), f"K = {', '.join(f'{k:g}' for k in args.k)}, "
                 f"{args.image_size} px, top {args.top}"), flush=True)
    table: dict[tuple[str, float], list] = {}
    with work_dir(args) as tmp:
        for data in datasets:
            data = with_test_split(data.resolve(), Path(tmp))  # the runs' cwd is elsewhere
            for seed in args.seeds:
                script = _script(data, seed, args.image_size, Path(tmp))
                print(f"{data.name} seed {seed}: script {script['acc']:.4f} / F1 "
                      f"{script['f1']:.4f} in {script['s']:.0f} s", flush=True)
                for k in args.k:
                    budget = k * script["s"]
                    work = Path(tmp) / f"{data.name}-k{k:g}"
                    try:
                        ours = run_product(data, seed, budget * (1 - args.ensemble_reserve),
                                           args, work)
                    except RuntimeError as e:  # one failed run must not lose the others
                        print(f"  K={k:g}: FAILED: {e}", flush=True)
                        continue
                    table.setdefault((data.name, k), []).append((script, ours, budget))
                    with open(Path(tmp) / "runs.jsonl", "a") as f:
                        f.write(json.dumps({"data": data.name, "seed": seed, "k": k,
                                            "budget_s": budget, "script": script,
                                            "product": ours}, default=str) + "\n")
                    _print_run(k, ours, budget)
    _table(table)


def read_runs(files: list[Path]) -> dict[tuple[str, float], list]:
    """The kept runs of `files` (runs.jsonl lines) as the table's rows: per dataset (in the
    order first seen) and K (ascending), one run per seed, the last line read for it."""
    runs: dict[tuple[str, float, int], dict] = {}
    for path in files:
        if not path.is_file():
            raise SystemExit(f"no kept runs at {path}: pass the runs.jsonl of a --keep folder")
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                runs[(rec["data"], float(rec["k"]), int(rec["seed"]))] = rec
    order = list(dict.fromkeys(name for name, _, _ in runs))
    table: dict[tuple[str, float], list] = {}
    for name, k, seed in sorted(runs, key=lambda key: (order.index(key[0]), key[1], key[2])):
        rec = runs[(name, k, seed)]
        table.setdefault((name, k), []).append((rec["script"], rec["product"], rec["budget_s"]))
    return table


def _print_run(k: float, ours: dict, budget: float) -> None:
    print(f"  K={k:g}: final ({ours['chosen']}) {ours['ensemble']['accuracy']:.4f} / "
          f"{ours['ensemble']['f1']:.4f}; refit {_acc(ours['final'])}, val-selected trial "
          f"{_acc(ours['trial'])}; {ours['search_s']:.0f} s search, "
          f"{ours['total_s']:.0f} s in all (budget {budget:.0f} s); trials {ours['trials']}",
          flush=True)
    print("    rows: " + ", ".join(f"{n} {r['test']['accuracy']:.4f}"
                                   for n, r in ours["rows"].items()
                                   if r["test"]["accuracy"] == r["test"]["accuracy"]),
          flush=True)
    if ours["plan"]:
        print(f"    plan: {ours['plan']}", flush=True)


def _acc(test: dict | None) -> str:
    return "-" if not test else f"{test['accuracy']:.4f}"


def _table(table: dict) -> None:
    """Per dataset and K, over seeds: the script, the product's final answer (the row
    ensemble.build chose), its refit, and the final answer's test errors relative to the
    script's own (goal: <= 0.8 at K=4, <= 0.9 at K=2, <= 1.02 at K=1)."""
    print("\n| dataset | K | script acc | final answer acc | refit acc | errors / script's | "
          "time / budget | final rows chosen |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, k), res in table.items():
        script = [r[0]["acc"] for r in res]
        final = [r[1]["ensemble"]["accuracy"] for r in res]
        refit = [r[1]["final"]["accuracy"] for r in res if r[1]["final"]]
        ratio = [(1 - f) / max(1 - s, 1e-9) for f, s in zip(final, script)]
        chosen = ", ".join(sorted({r[1]["chosen"] for r in res}))
        print(f"| {name} | {k:g} | {mean_std(script)} | {mean_std(final)} | "
              f"{mean_std(refit) if refit else '-'} | {mean_std(ratio)} | "
              f"{mean_std([r[1]['total_s'] / r[2] for r in res])} | {chosen} |", flush=True)


if __name__ == "__main__":
    main()
