"""CV ensembles, distillation and pseudo-labelling (issue 13's figures), side by side per seed.

    python -m benchmarks.cv_distill [--seeds 0 1 2] [--budget 6m] [--top 3] [--folds 5]
        [--holdout-top 5] [--parts cv distill pseudo] [--data DIR] [--quick]

Per seed, on the sign-language photos (or --data, a folder of class folders):
  cv       `search.run --time-budget B`, then `ensemble.build --top 5` (today's holdout ensemble:
           vote weights fit on val) and `ensemble.build --top 3 --folds 5` (the CV ensemble:
           weights fit on out-of-fold predictions). Test accuracy and NLL of both; for the best
           configuration, its val score against its CV score (spread within a seed and over
           seeds, and distance from its test accuracy).
  distill  `ensemble.distill` from the ensemble the last build chose: test accuracy and
           milliseconds per image of the best single trial, the teacher and the student, and
           the share of the teacher's gap over the best single model the student closes (the
           goal: at least half, at 1x cost).
  pseudo   half of the search's training images (stratified) lose their labels: a search on
           the rest (same val and test images), its ensemble as teacher, then one student
           without and one with the hidden half as --pseudo-label images.
Every command run is printed; then mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, add_keep_arg, header, mean_std, resolve_data, work_dir

PARTS = ("cv", "distill", "pseudo")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", default=None, help="class folders (default: the sign photos)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--budget", default="6m", help="--time-budget of every search")
    p.add_argument("--num-samples", type=int, default=10)
    p.add_argument("--max-epochs", type=int, default=8)
    p.add_argument("--top", type=int, default=3, help="configurations of the CV ensemble")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--holdout-top", type=int, default=5, help="trials of the holdout ensemble")
    p.add_argument("--pseudo-threshold", type=float, default=0.9)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    add_keep_arg(p)
    args = p.parse_args(argv)
    args.search = ["--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs)]
    if args.quick:
        args.seeds, args.image_size, args.budget, args.top, args.holdout_top = \
            args.seeds[:1], 32, "30m", 2, 2  # 2 trials of 2 epochs end it, not the budget
        args.folds, args.pseudo_threshold = 2, 0.4
        args.search = ["--num-samples", "2", "--max-epochs", "2", "--grace-period", "2",
                       "--init", "random", "--space", "batch_size=[8]"]
    args.data_name = resolve_data(args)
    return args


class Runner:
    """Runs the product's commands in one work folder (one MLflow store), printing each."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}

    def __call__(self, module: str, *args: str) -> str:
        print(f"$ python -m {module} {' '.join(args)}".replace(str(self.work) + "/", ""),
              flush=True)
        proc = subprocess.run([sys.executable, "-m", module, *args, "--storage",
                               str(self.work / "runs"), "--tracking-uri",
                               f"sqlite:///{self.work / 'mlflow.db'}"],
                              cwd=self.work, env=self.env, capture_output=True, text=True,
                              check=False)
        if proc.returncode:
            raise SystemExit(f"{module} failed:\n{proc.stderr[-3000:]}")
        return proc.stderr

    def exp(self, name: str) -> Path:
        return self.work / "runs" / name

    def search(self, name: str, data: Path, seed: int, args: argparse.Namespace) -> None:
        self("search.run", "--data", str(data), "--seed", str(seed), "--experiment", name,
             "--image-size", str(args.image_size), "--time-budget", args.budget, "--no-refit",
             *args.search)

    def build(self, name: str, *extra: str) -> dict:
        self("ensemble.build", "--experiment", name, *extra)
        report = json.loads((self.exp(name) / "ensemble" / "report.json").read_text())
        return report | {"by_name": {r["name"]: r for r in report["rows"]}}

    def distill(self, name: str, *extra: str) -> tuple[dict, Path]:
        self("ensemble.distill", "--experiment", name, *extra)
        reports = sorted((self.exp(name) / "students").glob("*/report.json"),
                         key=lambda p: p.stat().st_mtime)
        return json.loads(reports[-1].read_text()), reports[-1].parent


def run_seed(seed: int, run: Runner, args: argparse.Namespace) -> dict:
    name, out = f"signs-{seed}", {}
    run.search(name, args.data, seed, args)
    if "cv" in args.parts:
        holdout = run.build(name, "--top", str(args.holdout_top)) \
            if args.holdout_top != args.top else None
        out["cv"] = run.build(name, "--top", str(args.top), "--folds", str(args.folds))
        out["holdout"] = holdout or out["cv"]
        _print_cv(seed, out["holdout"], out["cv"], args)
    if "distill" in args.parts:
        if "cv" not in args.parts:
            run.build(name, "--top", str(args.holdout_top))
        out["distill"], _ = run.distill(name)
        _print_distill(seed, out["distill"])
    if "pseudo" in args.parts:
        out["pseudo"] = run_pseudo(seed, run, args)
    return out


def run_pseudo(seed: int, run: Runner, args: argparse.Namespace) -> dict:
    """A search on half the training labels (val and test as before), then students without
    and with the other half as unlabelled images."""
    split = json.loads((run.exp(f"signs-{seed}") / "split.json").read_text())["ids"]
    labelled, hidden = _halves(split["train"], seed)
    half, unlabelled = run.work / f"half-{seed}", run.work / f"unlabelled-{seed}"
    for part, ids in (("train", labelled), ("val", split["val"]), ("test", split["test"])):
        for i in ids:
            _link(args.data / i, half / part / i)
    truth = {}
    for j, i in enumerate(hidden):  # names carry nothing of the class
        truth[f"u{j:05d}{Path(i).suffix}"] = Path(i).parts[-2]
        _link(args.data / i, unlabelled / f"u{j:05d}{Path(i).suffix}")
    name = f"half-{seed}"
    run.search(name, half, seed, args)
    run.build(name, "--top", str(args.holdout_top))
    without, _ = run.distill(name)
    with_, folder = run.distill(name, "--pseudo-label", str(unlabelled), "--pseudo-threshold",
                                str(args.pseudo_threshold))
    import pandas as pd

    taken = pd.read_csv(folder / "pseudo_labels.csv", dtype=str)  # class names stay strings
    right = float(np.mean([truth[i] == p for i, p in zip(taken["image"], taken["prediction"])])
                  ) if len(taken) else float("nan")
    out = {"without": _row(without, "student"), "with": _row(with_, "student"),
           "taken": len(taken), "hidden": len(hidden), "precision": right,
           "labelled": len(labelled)}
    print(f"seed {seed} pseudo: {len(labelled)} labelled training images; student test acc "
          f"without {out['without']['test']['accuracy']:.4f}, with "
          f"{out['with']['test']['accuracy']:.4f} ({len(taken)} of {len(hidden)} unlabelled "
          f"images taken at >= {args.pseudo_threshold}, {right:.1%} of them labelled right)",
          flush=True)
    return out


def _halves(ids: list[str], seed: int) -> tuple[list[str], list[str]]:
    """A stratified half of the training images keeps its labels; the other half loses them."""
    from sklearn.model_selection import train_test_split

    classes = [Path(i).parts[-2] for i in ids]
    keep, hide = train_test_split(ids, test_size=0.5, random_state=seed, stratify=classes)
    return sorted(keep), sorted(hide)


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        os.symlink(src.resolve(), dest)


def _row(report: dict, prefix: str) -> dict:
    return next(r for r in report["rows"] if r["name"].startswith(prefix))


# ---------------------------------------------------------------------- printing


def _print_cv(seed: int, holdout: dict, cv: dict, args: argparse.Namespace) -> None:
    h, c = holdout["by_name"], cv["by_name"]
    best = cv["cv"][0]
    print(f"seed {seed} cv: holdout top {args.holdout_top}: soft vote "
          f"{h['soft vote']['test']['accuracy']:.4f}, weighted vote "
          f"{h['weighted vote']['test']['accuracy']:.4f} | CV top {args.top} x {args.folds}: "
          f"soft vote {c['folds soft vote']['test']['accuracy']:.4f}, weighted vote "
          f"{c['folds weighted vote']['test']['accuracy']:.4f} | best configuration: val "
          f"{best['holdout_val']:.4f}, CV {best['cv_mean']:.4f} ± {best['cv_std']:.4f}, "
          f"test {h['best single']['test']['accuracy']:.4f}", flush=True)


def _print_distill(seed: int, report: dict) -> None:
    best, teacher, student = report["rows"]
    gap = report["gap_closed"]
    print(f"seed {seed} distill: " + ", ".join(
        f"{r['name']} {r['test']['accuracy']:.4f} ({r['ms_per_image']:.3f} ms/img)"
        for r in (best, teacher, student))
        + f" | gap closed: {'n/a (teacher not ahead)' if gap is None else f'{gap:.0%}'}",
        flush=True)


def _cv_tables(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\n### CV ensemble (top {args.top} x {args.folds} folds) against the holdout "
          f"ensemble (top {args.holdout_top})\n")
    print("| ensemble | test acc | test NLL | test ECE | models | ms/img |")
    print("|---|---|---|---|---|---|")
    for label, key, row in (("holdout soft vote", "holdout", "soft vote"),
                            ("holdout weighted vote", "holdout", "weighted vote"),
                            ("holdout best single", "holdout", "best single"),
                            ("CV soft vote", "cv", "folds soft vote"),
                            ("CV weighted vote", "cv", "folds weighted vote")):
        rows = [r[key]["by_name"][row] for r in results]
        print(f"| {label} | {mean_std([x['test']['accuracy'] for x in rows])} | "
              f"{mean_std([x['test']['loss'] for x in rows])} | "
              f"{mean_std([x['test']['ece'] for x in rows])} | "
              f"{mean_std([len(x['members']) for x in rows])} | "
              f"{mean_std([x['ms_per_image'] for x in rows])} |")
    diff = [r["cv"]["by_name"]["folds weighted vote"]["test"]["accuracy"]
            - r["holdout"]["by_name"]["weighted vote"]["test"]["accuracy"] for r in results]
    print(f"\nCV weighted vote - holdout weighted vote, test accuracy: {mean_std(diff)}")
    _score_table(results)


def _score_table(results: list[dict]) -> None:
    """The best configuration's val score and CV score as estimates of its test accuracy."""
    val = [r["cv"]["cv"][0]["holdout_val"] for r in results]
    cv = [r["cv"]["cv"][0]["cv_mean"] for r in results]
    test = [r["holdout"]["by_name"]["best single"]["test"]["accuracy"] for r in results]
    n_val = [r["cv"]["split_sizes"]["val"] for r in results]
    se_val = [float(np.sqrt(v * (1 - v) / n)) for v, n in zip(val, n_val)]
    sd_cv = [r["cv"]["cv"][0]["cv_std"] for r in results]
    print("\n### The best configuration's score: one val split against K folds\n")
    print("| score | mean | spread within a seed | std over seeds | abs(score - test acc) |")
    print("|---|---|---|---|---|")
    for label, s, spread, what in (("val (holdout)", val, se_val, "binomial s.e."),
                                   ("CV (mean over folds)", cv, sd_cv, "std over folds")):
        print(f"| {label} | {mean_std(s)} | {mean_std(spread)} ({what}) | "
              f"{np.std(s, ddof=1) if len(s) > 1 else 0.0:.4f} | "
              f"{mean_std([abs(a - b) for a, b in zip(s, test)])} |")


def _distill_table(results: list[dict]) -> None:
    print("\n### Distilled student against the best single trial and its teacher\n")
    print("| model | test acc | test NLL | params | ms/img |")
    print("|---|---|---|---|---|")
    for k, label in enumerate(("best single", "teacher", "student")):
        rows = [r["distill"]["rows"][k] for r in results]
        print(f"| {label} | {mean_std([x['test']['accuracy'] for x in rows])} | "
              f"{mean_std([x['test']['loss'] for x in rows])} | "
              f"{np.mean([x['params_x_members'] for x in rows]) / 1e6:.2f}M | "
              f"{mean_std([x['ms_per_image'] for x in rows])} |")
    gaps = [r["distill"]["gap_closed"] for r in results]
    known = [g for g in gaps if g is not None]
    met = sum(g >= 0.5 for g in known)
    print(f"\nteachers: {', '.join(r['distill']['rows'][1]['name'] for r in results)}")
    if not known:
        print("share of the teacher's gap closed by the student: cannot be judged, the teacher "
              "was not ahead of the best single model in any seed")
        return
    verdict = "met" if met == len(known) else "NOT met"
    print(f"share of the teacher's gap closed by the student: {mean_std(known)} over "
          f"{len(known)} seed(s) where the teacher was ahead; the goal (at least half, at 1x "
          f"cost) is {verdict} ({met} of {len(known)} seeds)")


def _pseudo_table(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\n### Pseudo-labelling: half of the training labels hidden (threshold "
          f"{args.pseudo_threshold})\n")
    print("| student | test acc | test NLL | training images |")
    print("|---|---|---|---|")
    for key, label in (("without", "labelled half only"), ("with", "+ pseudo-labels")):
        rows = [r["pseudo"][key] for r in results]
        images = [r["pseudo"]["labelled"] + (r["pseudo"]["taken"] if key == "with" else 0)
                  for r in results]
        print(f"| {label} | {mean_std([x['test']['accuracy'] for x in rows])} | "
              f"{mean_std([x['test']['loss'] for x in rows])} | {mean_std(images)} |")
    gain = [r["pseudo"]["with"]["test"]["accuracy"] - r["pseudo"]["without"]["test"]["accuracy"]
            for r in results]
    print(f"\nwith - without, test accuracy: {mean_std(gain)}; pseudo-labels taken "
          f"{mean_std([r['pseudo']['taken'] for r in results])} of "
          f"{mean_std([r['pseudo']['hidden'] for r in results])}, right "
          f"{mean_std([r['pseudo']['precision'] for r in results])}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(header(f"cv, distillation and pseudo-labels ({args.data_name})", len(args.seeds),
                 f"parts {'/'.join(args.parts)}, budget {args.budget} per search, CV top "
                 f"{args.top} x {args.folds} folds vs holdout top {args.holdout_top}, "
                 f"{args.image_size} px"), flush=True)
    print("(every command below also gets --storage WORK/runs --tracking-uri "
          "sqlite:///WORK/mlflow.db, WORK a temporary folder)", flush=True)
    results = []
    with work_dir(args) as tmp:
        run = Runner(Path(tmp))
        for seed in args.seeds:
            results.append(run_seed(seed, run, args))
    if "cv" in args.parts:
        _cv_tables(results, args)
    if "distill" in args.parts:
        _distill_table(results)
    if "pseudo" in args.parts:
        _pseudo_table(results, args)


if __name__ == "__main__":
    main()
