"""Trial start-up cost: seconds from trial start to its first reported result.

    python -m benchmarks.startup [--repeats 3] [--quick]

Three kinds of Tune trial, each run as its own Tuner of --repeats trials one after another
(max_concurrent_trials=1), each kind in a fresh Python process on a fresh local Ray of 2 CPUs:
a plain `ray.init` for the plain trial, the search's `start_ray` for ours. Before Ray starts,
every kind does the same driver set-up (load the digits, build the initial weights), in the order
`search.run` does it (data, split and initial weights first, then Ray).

- plain: a Tune function trial that only calls ray.tune.report({"x": 1});
- ours 1 worker: the search's trainable (search.tune.make_trainable + plan_resources) training
  inline in the trial;
- ours 2 workers: the same with workers_per_trial 2 (a Ray Train TorchTrainer, DDP).

Ours train 1 epoch of 64 digits at 32 px (batch 32) and evaluate 32, so the first result is the
report after epoch 1 (the seconds it spent training are printed too). A Tune Callback on the
driver times every trial the same way: time.time() at on_trial_start to its first
on_trial_result, and from the previous trial's end (Tuner.fit for the first) to that result.
Tune calls on_trial_start once the trial's actor is up, so the first measure leaves out the
actor's start (worker process, imports, unpickling the trainable): the plain trial's is ~0 s and
ratios to it mean little. The second includes it; the goal (ours_1w/plain <= 1.5) is judged on
it. Ratios are of the means. The first trial of each kind is also timed from `ray.init`: the
whole cold start a user waits for.
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

from benchmarks.common import REPO, header, mean_std

KINDS = ("plain", "ours_1w", "ours_2w")
TRAIN, VAL = 64, 32
SPACE = {"lr": 0.003, "batch_size": 32, "epochs": 1, "scheduler": "cosine", "dropout": 0.0,
         "weight_decay": 0.0001}


def plain_trial(config: dict) -> None:
    """The cheapest Tune function trial: one report."""
    from ray import tune

    tune.report({"x": 1})


def make_timer(fit_start: list[float]):
    """A Tune Callback timing each trial's first result from its start and the previous end."""
    from ray.tune import Callback

    class FirstResultTimer(Callback):
        def __init__(self) -> None:
            self.started: dict[str, tuple[float, float]] = {}
            self.first: dict[str, tuple[float, float]] = {}  # time, epoch-1 training seconds
            self.last_end: float | None = None

        def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
            before = self.last_end if self.last_end is not None else fit_start[0]
            self.started[trial.trial_id] = (time.time(), before)

        def on_trial_result(self, iteration: int, trials: list, trial, result: dict,
                            **info) -> None:
            rate = result.get("train_images_per_s")
            self.first.setdefault(trial.trial_id, (time.time(), TRAIN / rate if rate else 0.0))

        def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
            self.last_end = time.time()

        def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
            self.last_end = time.time()

        def seconds(self) -> list[dict[str, float]]:
            """Per trial in start order: start -> first result, previous end -> first result,
            and the seconds epoch 1 spent training."""
            order = sorted(self.started, key=lambda t: self.started[t][0])
            return [{"start": self.first[t][0] - self.started[t][0],
                     "prev_end": self.first[t][0] - self.started[t][1],
                     "training": self.first[t][1], "at": self.first[t][0]}
                    for t in order if t in self.first]

    return FirstResultTimer()


def tiny_data():
    """TRAIN + VAL digits at 32 px and the initial weights: the first to train on, then to
    evaluate. Built before Ray starts, as the search builds its data, split and init."""
    from trainables.data import ImageData, load_data
    from trainables.models import create_model, initial_state, normalization

    full = load_data(None, image_size=32)
    n = TRAIN + VAL
    data = ImageData(images=full.images[:n].copy(), labels=full.labels[:n].copy(),
                     class_names=full.class_names, ids=full.ids[:n], source=f"digits[:{n}]")
    init = initial_state("resnet10t", data.num_classes, seed=0)
    return data, init, normalization(create_model("resnet10t", data.num_classes))


def tiny_inputs(data, init, norm):
    """`tiny_data` in the object store, as trial inputs (keyed by architecture, as a search
    passes them)."""
    import numpy as np
    import ray

    from trainables.inputs import TrialInputs

    n = TRAIN + VAL
    return {"resnet10t": TrialInputs(data=ray.put(data), init_state=ray.put(init),
                                     train_idx=np.arange(TRAIN), val_idx=np.arange(TRAIN, n),
                                     mean=norm[0], std=norm[1])}


def search_config(workers: int, storage: Path):
    from search.config import parse_config

    space = [a for k, v in SPACE.items() for a in ("--space", f"{k}={v}")]
    return parse_config(["--workers-per-trial", str(workers), "--num-cpus", "2",
                         "--max-epochs", "1", "--image-size", "32", *space,
                         "--storage", str(storage), "--experiment", f"startup-w{workers}"])


def our_trainable(workers: int, inputs, storage: Path):
    """The trainable exactly as the search builds it, sized by the search's resource plan."""
    import ray

    from search.resources import plan_resources
    from search.tune import make_trainable
    from trainables.store import ExperimentStore

    cfg = search_config(workers, storage)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    plan = plan_resources(cfg, ray.cluster_resources(), nodes)
    return make_trainable(cfg, plan, inputs, ExperimentStore(cfg.experiment_dir))


def time_kind(name: str, trainable, repeats: int, storage: Path) -> list[dict[str, float]]:
    """Runs `repeats` trials one after another; their start-up times."""
    from ray import tune

    fit_start = [0.0]
    timer = make_timer(fit_start)
    tuner = tune.Tuner(
        trainable, param_space=dict(SPACE),
        # reuse_actors as in the search (search.tune.make_tuner), for every kind alike
        tune_config=tune.TuneConfig(num_samples=repeats, max_concurrent_trials=1,
                                    reuse_actors=True,
                                    trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=[timer],
                                  verbose=0))
    fit_start[0] = time.time()
    results = tuner.fit()
    if results.errors:
        raise SystemExit(f"{name}: {len(results.errors)} trial(s) failed: {results.errors[0]}")
    return timer.seconds()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="trials per kind")
    p.add_argument("--quick", action="store_true", help="1 trial per kind (smoke test)")
    p.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if args.one:
        print("RESULT " + json.dumps(one_kind(args.one, args.repeats)), flush=True)
        return
    print(header("trial start-up (Tune trial start -> first result)", args.repeats,
                 "each kind in a fresh process on a fresh local Ray of 2 CPUs, trials one after "
                 "another, ours: 1 epoch of 64 digits at 32 px"), flush=True)
    got: dict[str, list[dict[str, float]]] = {}
    for kind in KINDS:
        # a fresh interpreter per kind: each pays the same driver imports and set-up
        proc = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--one", kind,
                               "--repeats", str(args.repeats)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{kind} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        got[kind] = json.loads(lines[-1][len("RESULT "):])
        print(f"{kind:<8} " + ", ".join(
            f"{r['start']:.2f} s ({r['prev_end']:.2f} s from the previous end, "
            f"{r['training']:.2f} s training)" for r in got[kind]), flush=True)
    report(got)


def one_kind(kind: str, repeats: int) -> list[dict[str, float]]:
    """One kind on its own fresh local Ray, started the way its user starts it: a plain
    ray.init for the plain trial, the search's start_ray for ours, after the same driver
    set-up for every kind."""
    import ray
    from ray import tune

    base = tiny_data()
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp)
        init_start = time.time()
        if kind == "plain":
            ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        else:
            from trainables.cli import start_ray

            cfg = search_config(1, storage)
            start_ray(cfg.address, cfg.num_cpus)
        try:
            trainable = tune.with_resources(plain_trial, {"cpu": 1}) if kind == "plain" else \
                our_trainable(2 if kind == "ours_2w" else 1, tiny_inputs(*base), storage)
            got = time_kind(kind, trainable, repeats, storage)
        finally:
            ray.shutdown()
    for r in got:  # the whole cold start: ray.init to the first result
        r["from_init"] = r.pop("at") - init_start
    return got


def report(got: dict[str, list[dict[str, float]]]) -> None:
    """Mean ± std per kind, ratios to the plain trial, first vs later trials of ours_1w."""
    print("\n| kind | trial start -> first result (s) | previous end -> first result, "
          "actor start included (s) | of which epoch-1 training (s) |")
    print("|---|---|---|---|")
    for kind in KINDS:
        print(f"| {kind} | " + " | ".join(mean_std([r[k] for r in got[kind]])
                                          for k in ("start", "prev_end", "training")) + " |")

    def ratio(kind: str, key: str) -> str:
        mean = [sum(r[key] for r in got[k]) / len(got[k]) for k in (kind, "plain")]
        return f"{mean[0] / mean[1]:.2f}"

    print(f"\nratio ours_1w/plain {ratio('ours_1w', 'prev_end')} actor start included "
          f"(goal <= 1.5), {ratio('ours_1w', 'start')} from on_trial_start; ours_2w/plain "
          f"{ratio('ours_2w', 'prev_end')} actor start included, {ratio('ours_2w', 'start')} "
          "from on_trial_start")
    print("\nfirst trial of each kind (cold: a fresh Ray, no process reused yet):")
    for kind in KINDS:
        r = got[kind][0]
        print(f"  {kind:<8} {r['prev_end']:.2f} s from Tuner.fit, {r['from_init']:.2f} s from "
              "ray.init")
    for kind in ("ours_1w", "ours_2w"):
        a, b = got[kind][0], got["plain"][0]
        print(f"first-trial ratio {kind}/plain {a['prev_end'] / b['prev_end']:.2f} from "
              f"Tuner.fit, {a['from_init'] / b['from_init']:.2f} from ray.init")
    first, *later = got["ours_1w"]
    rest = (f"{mean_std([r['start'] for r in later])} s "
            f"({mean_std([r['prev_end'] for r in later])} s from the previous end)"
            if later else "n/a (one trial)")
    print(f"ours_1w first trial {first['start']:.2f} s ({first['prev_end']:.2f} s from "
          f"Tuner.fit); later trials {rest}", flush=True)


if __name__ == "__main__":
    main()
