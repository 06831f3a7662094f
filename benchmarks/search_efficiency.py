"""Search efficiency at an equal wall-clock budget on the sign-language photos.

    python -m benchmarks.search_efficiency [--budget-s 180] [--seeds 0 1 2] [--target 0.95]

Three methods, the same space, data, split (seed), model and training function:
  ours        Optuna TPE + ASHA in Ray Tune, first trial the recommended configuration
              (python -m search.run, the defaults)
  ours_no_default  the same without the recommended first trial (--no-start-with-default):
              what TPE + ASHA alone contribute
  random      random search (Optuna's RandomSampler over the same space) + FIFO in Ray Tune
              (python -m search.run --search-algorithm random --early-stopping none
              --no-start-with-default)
  sequential  an Optuna study (TPE + median pruner) calling trainables.fit one trial at a time
              without Ray, with both CPU threads
Per method and seed: best val accuracy at the budget, the test accuracy of that trial, trials
finished, and the time from the command's start until any trial first reached --target val
accuracy, for each of --targets. Mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import REPO, add_search_args, header, mean_std, resolve_data

METHODS = ("ours", "ours_no_default", "random", "sequential")
TUNE_ARGS = {  # python -m search.run flags per method
    "ours": [],
    "ours_no_default": ["--no-start-with-default"],
    "random": ["--search-algorithm", "random", "--early-stopping", "none",
               "--no-start-with-default"],
}
FINISHED = ("completed", "stopped_early")


def run_tune(method: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    name = f"{method}{seed}"
    extra = TUNE_ARGS[method]
    start = time.time()
    subprocess.run([sys.executable, "-m", "search.run", "--data", str(args.data), "--seed",
                    str(seed), "--num-samples", "200", "--time-budget-s", str(args.budget_s),
                    "--image-size", str(args.image_size), "--experiment", name, "--storage",
                    str(work / "runs"), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
                    *extra], cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
                   capture_output=True)
    exp = work / "runs" / name
    summary = json.loads((exp / "summary.json").read_text())
    table = pd.read_csv(exp / "results.csv", dtype={"trial_id": str})
    curve = []
    for tid in table["trial_id"]:
        results = exp / f"trial_{tid}" / "result.json"
        if not results.is_file():  # started as the budget ran out: never reported
            continue
        for line in results.read_text().splitlines():
            r = json.loads(line)
            curve.append((r["timestamp"] - start, r.get("val_acc", 0.0)))
    return {"best_val": summary["val"]["accuracy"], "test": summary["test"]["accuracy"],
            "finished": int(table["status"].isin(FINISHED).sum()),
            "to_target": _first_reach(curve, args.targets)}


def _first_reach(curve: list[tuple[float, float]], targets: list[float]) -> dict[float, float]:
    """Seconds until any trial first reported val accuracy >= each target (NaN: never)."""
    out = {}
    for t in targets:
        hits = [s for s, acc in curve if acc >= t]
        out[t] = min(hits) if hits else float("nan")
    return out


def run_sequential(seed: int, args: argparse.Namespace, work: Path) -> dict:
    """Optuna TPE + median pruner, one trial after another, the same `fit` without Ray."""
    import optuna
    import torch

    from search.config import parse_config
    from search.space import SpaceSampler
    from trainables import TrialInputs, draw_split, fit, load_data, load_trained
    from trainables.metrics import classification_metrics
    from trainables.models import create_model, initial_state, normalization
    from trainables.train import predict_proba

    start = time.time()
    deadline = start + args.budget_s
    cfg = parse_config(["--data", str(args.data), "--seed", str(seed)])
    data = load_data(args.data, image_size=args.image_size)
    split = draw_split(data.labels, val_fraction=0.15, test_fraction=0.15, seed=seed)
    mean, std = normalization(create_model(cfg.train.model, data.num_classes))
    inputs = TrialInputs(data, initial_state(cfg.train.model, data.num_classes, seed=seed),
                         split.train, split.val, mean, std)
    sampler = SpaceSampler(cfg.space)
    curve: list[tuple[float, float]] = []
    finished = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal finished
        params = {**sampler(trial), **trial.params}
        train_cfg = dataclasses.replace(cfg.train, threads=2, **params)

        def report(m: dict) -> None:
            curve.append((time.time() - start, m["val_acc"]))
            trial.report(m["best_val_acc"], m["epoch"])
            if time.time() > deadline:
                raise optuna.TrialPruned()  # out of budget: stop mid-trial, like Tune does
            if trial.should_prune():
                raise optuna.TrialPruned()

        ckpt = work / "seq" / f"{seed}-{trial.number}.pt"
        trial.set_user_attr("checkpoint", str(ckpt))
        best = fit(train_cfg, inputs, str(ckpt), report=report)
        finished += 1
        return best["val_acc"]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=5, multivariate=True),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, timeout=args.budget_s, catch=())
    scored = [t for t in study.trials if t.intermediate_values]
    best = max(scored, key=lambda t: max(t.intermediate_values.values()))
    model, ckpt = load_trained(best.user_attrs["checkpoint"], torch.device("cpu"))
    probs = predict_proba(model, data.images, split.test, mean=ckpt["mean"], std=ckpt["std"])
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    return {"best_val": max(best.intermediate_values.values()),
            "test": classification_metrics(probs, data.labels[split.test])["accuracy"],
            "finished": finished + pruned, "to_target": _first_reach(curve, args.targets)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_search_args(p)
    p.add_argument("--budget-s", type=float, default=180)
    p.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.98, 0.99])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = p.parse_args(argv)
    print(header(f"search efficiency ({resolve_data(args)})", len(args.seeds),
                 f"budget {args.budget_s:g} s per search, target val acc {args.targets}, "
                 f"{args.image_size} px, resnet10t"), flush=True)
    got: dict[str, list[dict]] = {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method in args.methods:
                r = run_sequential(seed, args, Path(tmp)) if method == "sequential" else \
                    run_tune(method, seed, args, Path(tmp))
                got[method].append(r)
                reach = ", ".join(f"{t}: {s:.0f} s" for t, s in r["to_target"].items())
                print(f"seed {seed} {method}: best val {r['best_val']:.4f}, test "
                      f"{r['test']:.4f}, {r['finished']} trials finished, target reached at "
                      f"{reach}", flush=True)
    targets = " | ".join(f"to {t} (s)" for t in args.targets)
    print(f"\n| method | best val acc | test acc | trials finished | {targets} |")
    print("|---|---|---|---|" + "---|" * len(args.targets))
    for m, rs in got.items():
        cells = []
        for t in args.targets:
            hit = [r["to_target"][t] for r in rs if not math.isnan(r["to_target"][t])]
            cells.append(f"{mean_std(hit) if hit else 'never'} ({len(hit)}/{len(rs)})")
        print(f"| {m} | {mean_std([r['best_val'] for r in rs])} | "
              f"{mean_std([r['test'] for r in rs])} | "
              f"{mean_std([r['finished'] for r in rs])} | " + " | ".join(cells) + " |")
    if "ours" in got and "random" in got:
        for t in args.targets:
            pairs = [(a["to_target"][t], b["to_target"][t])
                     for a, b in zip(got["ours"], got["random"])]
            ratios = [a / b for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
            never = sum(math.isnan(b) and not math.isnan(a) for a, b in pairs)
            print(f"time to {t}, ours / random: "
                  f"{mean_std(ratios) if ratios else 'n/a'} over {len(ratios)} seed(s) where "
                  f"both reached it; random never reached it in {never} where ours did "
                  "(goal <= 0.5)")


if __name__ == "__main__":
    main()
