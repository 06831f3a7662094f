"""The recommended recipe's settings, judged on the suite rather than on one dataset.

    python -m benchmarks.recipes [--data DIR ...] [--seeds 0] [--epochs 15] [--parallel 2]
        [--variant NAME=KNOB=VALUE,KNOB=VALUE ...]

Per dataset (default: the suite of `benchmarks.vs_script`, with the same fixed test split) and
seed, each variant of the recipe trains once as a user would run it, `search.run --recipe-only
--max-epochs E` (train + val, no search), and its test accuracy is read from summary.json. The
variants are named sets of --space values on top of the recommended recipe; `current` is the
recipe itself. `--parallel 2` runs two at once with one CPU each: accuracies only, no timings.
Prints one row per run and a table of dataset x variant, mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import REPO, add_keep_arg, header, mean_std, work_dir
from benchmarks.vs_script import suite, with_test_split

VARIANTS = {
    "current": [],
    "lr 2e-3": ["lr=0.002"],
    "light": ["augment=light"],
    "lr 2e-3, light": ["lr=0.002", "augment=light"],
}


def run_variant(data: Path, seed: int, name: str, space: list[str], args: argparse.Namespace,
                work: Path) -> dict:
    exp = f"{data.name}-{name.replace(' ', '').replace(',', '_')}-{seed}"
    cpus = max(1, (os.cpu_count() or 1) // args.parallel)
    cmd = [sys.executable, "-m", "search.run", "--data", str(data), "--recipe-only",
           "--max-epochs", str(args.epochs), "--seed", str(seed), "--image-size",
           str(args.image_size), "--experiment", exp, "--storage", str(work / "runs"),
           "--tracking-uri", f"sqlite:///{work / (exp + '.db')}", "--num-cpus", str(cpus),
           "--overwrite"]
    for item in space:
        cmd += ["--space", item]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    (work / f"{exp}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode:
        return {"data": data.name, "seed": seed, "variant": name, "error": proc.stderr[-500:]}
    summary = json.loads((work / "runs" / exp / "summary.json").read_text())
    return {"data": data.name, "seed": seed, "variant": name,
            "acc": summary["final"]["test"]["accuracy"], "f1": summary["final"]["test"]["f1"],
            "seconds": summary["refit"]["seconds"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--variant", nargs="+", default=None, metavar="NAME=KNOB=VALUE,...",
                   help="variants to run instead of the built-in ones")
    add_keep_arg(p)
    args = p.parse_args(argv)
    variants = VARIANTS if not args.variant else {
        v.split("=", 1)[0]: [s for s in v.split("=", 1)[1].split(",") if s]
        for v in args.variant}
    datasets = args.data or suite()
    print(header(f"recipe variants ({', '.join(d.name for d in datasets)})", len(args.seeds),
                 f"{args.epochs} epochs, {args.image_size} px, variants "
                 f"{'; '.join(f'{k}: {v}' for k, v in variants.items())}"), flush=True)
    with work_dir(args) as tmp:
        jobs = [(with_test_split(d.resolve(), Path(tmp)), s, n, v)
                for d in datasets for s in args.seeds for n, v in variants.items()]
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = [pool.submit(run_variant, d, s, n, v, args, Path(tmp))
                       for d, s, n, v in jobs]
            results = []
            for f in futures:
                r = f.result()
                results.append(r)
                print(json.dumps(r), flush=True)
    print("\n| dataset | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for name in dict.fromkeys(r["data"] for r in results):
        cells = []
        for v in variants:
            accs = [r["acc"] for r in results if r["data"] == name and r["variant"] == v
                    and "acc" in r]
            cells.append(mean_std(accs) if accs else "failed")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
