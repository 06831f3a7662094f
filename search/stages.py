"""The stages of a search, in the order `search.run` calls them, each a function of what the
earlier ones produced: plan, tracking (and the data report), starts, trials, selection, refit,
test, explain, register, summary."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from search.budget import BudgetPlan, epochs_cap
from search.config import SearchConfig
from search.resources import ResourcePlan
from search.start import Start
from search.tracking import SearchRun
from trainables.checkpoint import Checkpoint
from trainables.config import TrainConfig
from trainables.data import ImageData
from trainables.defaults import FINISH_S, GPU_BATCHES, REFIT_STRETCH, SLACK, SPACE, SPEED_DOUBT
from trainables.errors import UserError
from trainables.metrics import classification_metrics
from trainables.split import Split
from trainables.store import ENDED, FINISHED, ExperimentStore, code_version, ranked

log = logging.getLogger("search")


@dataclass(frozen=True)
class Clock:
    """When the command started, and its --time-budget in seconds (None: no budget)."""

    t0: float
    budget_s: float | None

    def seconds_left(self) -> float | None:
        return None if self.budget_s is None else self.budget_s - (time.time() - self.t0)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def line(self, phase: str, detail: str = "") -> str:
        """Where the run stands: '[search | 3m12s used, 16m48s left of 20m00s] detail'."""
        from trainables.jobs import duration

        head = f"[{phase} | {duration(self.elapsed())} used"
        left = self.seconds_left()
        if left is not None:
            head += f", {duration(max(0.0, left))} left of {duration(self.budget_s)}"
        return f"{head}] {detail}".rstrip()

    def say(self, phase: str):
        """A progress callback that prints status lines of `phase` (the jobs' heartbeat)."""
        return lambda detail: print(self.line(phase, detail), flush=True)


# ---------------------------------------------------------------------- settings from the data


def suit_data(cfg: SearchConfig, data: ImageData) -> SearchConfig:
    """What the data itself decides where the user did not: images without an up or down
    (microscopy, aerial, textures: `trainables.augment.orientation`) train with quarter turns
    and vertical flips (`dihedral`) in place of the small shifts and turns of `light`, and the
    recipe with those exact symmetries alone (`augment none`; `strong` stays searchable). A
    continued search keeps what its first run decided (its saved config).

    On blood-cell scans at 15 epochs (2 seeds, benchmarks/RESULTS.md): the symmetries alone
    0.9673, with light's brightness changes 0.9603, light's shifts and turns (the recipe) 0.9556
    on seed 0, both together 0.9463 on seed 0."""
    from trainables.augment import orientation

    if ({"dihedral", "augment"} & set(cfg.given) or "dihedral" in cfg.space
            or cfg.train.dihedral):
        return cfg
    found = orientation(data.images, seed=cfg.seed)
    if not found["free"]:
        return cfg
    space = dict(cfg.space)
    if space.get("augment") == SPACE["augment"]:  # the default choices, not the user's
        space["augment"] = ["none", "strong"]
    log.info("data: the images have no up or down (vertical / horizontal edges %.2f, a quarter "
             "turn changes the mean image by %.2f of their contrast): quarter turns and vertical "
             "flips take the place of small shifts and turns, and the recipe trains with them "
             "and flips alone (--no-dihedral, or --augment, keeps the usual augmentation)",
             found["gradients"], found["mean_turn"])
    return dataclasses.replace(cfg, space=space,
                               train=dataclasses.replace(cfg.train, dihedral=True))


def suit_machine(cfg: SearchConfig, gpus: float) -> SearchConfig:
    """Batch sizes for the hardware where the user did not choose them: a search whose trials or
    solo jobs (recipe, warm start, refit) train on a GPU draws from `GPU_BATCHES`, so its
    recipe, the smallest batch offered, trains 64 images a step there; on CPUs it trains 32."""
    if gpus <= 0 or cfg.space.get("batch_size") != SPACE["batch_size"]:
        return cfg
    return dataclasses.replace(cfg, space={**cfg.space, "batch_size": list(GPU_BATCHES)})


# ---------------------------------------------------------------------- plan


def plan(cfg: SearchConfig, data: ImageData, split: Split, starts: dict[str, Start],
         clock: Clock, *, resumed: bool) -> tuple[SearchConfig, ResourcePlan, BudgetPlan | None]:
    """How the search maps onto the cluster and, with --time-budget, how it fits the budget:
    measures this machine's training speed, then plans epochs, trials, the warm start and the
    refit. Returns the config the search runs with, its resources and the budget plan."""
    from search import budget
    from search.resources import plan_for_cluster
    from search.start import needs_warm_start
    from trainables.jobs import cluster_nodes, whole_node

    node = whole_node(cluster_nodes())  # what the recipe, warm start and refit train on
    if not resumed:  # a continued search keeps the space its first run planned with
        cfg = suit_machine(cfg, max(cfg.gpus_per_worker, node.gpus))
    if cfg.recipe_only and not resumed and cfg.budget_s is None:
        cfg = budget.recipe_config(cfg)
    resources = plan_for_cluster(cfg)
    if cfg.budget_s is None or resumed:
        return cfg, resources, None
    models = list(starts)
    solo = node.threads
    sizes = split.sizes()
    # trials are timed at the smallest batch they may draw, what trains alone (the recipe, the
    # warm start, mostly the refit) at the recipe's own batch
    recipe_batch = int(budget.recipe_space(cfg).get("batch_size", cfg.train.batch_size))

    def plan_at(measured: budget.Speed) -> budget.BudgetPlan:
        return budget.plan_budget(
            cfg, remaining_s=clock.seconds_left(), speed=measured, n_train=sizes["train"],
            n_val=sizes["val"], n_test=sizes["test"], plan=resources,
            warm=len(models) if needs_warm_start(cfg, starts) else 0)

    def no_search_fits(seconds: float) -> bool:
        # a first short timing settles a budget that fits no search even at SPEED_DOUBT times
        # its pace: the recipe fits its length to the time left on its own epochs anyway
        try:
            fast = budget.Speed(trial=seconds / SPEED_DOUBT, solo=seconds / SPEED_DOUBT)
            return plan_at(fast).recipe
        except UserError:
            return False  # the full timing decides, and says so

    solo_s = speed(cfg, data, models, solo, batch=recipe_batch, enough=no_search_fits)
    # a trial (fewer threads) trains no faster than the whole machine: when even that speed
    # leaves no room for a search, the trials' own timing (~3 s) would only confirm it
    measured = budget.Speed(trial=solo_s, solo=solo_s)
    the_plan = plan_at(measured)
    if not the_plan.recipe:
        measured = budget.Speed(trial=speed(cfg, data, models, resources.threads), solo=solo_s)
        the_plan = plan_at(measured)
    cfg = budget.apply(cfg, the_plan)
    pace = f"{1000 * measured.solo:.1f} ms per training image alone on the machine"
    if not the_plan.recipe or measured.trial != measured.solo:
        pace = f"{1000 * measured.trial:.1f} ms per training image per trial, " + pace
    batch = f", batches of {cfg.space['batch_size']}" if the_plan.recipe else ""
    log.info("time budget %s: %s%s (measured %s)", cfg.time_budget, the_plan.describe(), batch,
             pace)
    return cfg, plan_for_cluster(cfg), the_plan


def speed(cfg: SearchConfig, data: ImageData, models: list[str], threads: int,
          batch: int = 32, enough: Callable[[float], bool] | None = None) -> float:
    """Training seconds per image with `threads` threads at batch size `batch`, averaged over
    the architectures: the fastest of three timings of three steps each after two warm-up
    steps (~4.7 s for resnet10t at 64 px on 2 cores), or only the first timing when `enough`
    finds it settles the question (~2 s)."""
    from trainables.speed import SpeedProbe

    size = int(data.images.shape[1])
    probes = [SpeedProbe(dataclasses.replace(cfg.train, model=m), data.num_classes, size,
                         threads=threads, batch_size=batch) for m in models]
    first = sum(p.seconds_per_image(repeats=1) for p in probes) / len(probes)
    if enough is not None and enough(first):
        return first
    return sum(p.seconds_per_image(repeats=2) for p in probes) / len(probes)


# ---------------------------------------------------------------------- tracking, data report


def prepare_tracking(cfg: SearchConfig) -> threading.Thread:
    """Opens a new search's MLflow store in the background, while Ray starts: creating a new
    sqlite store's tables (MLflow's migrations) takes ~3.5 s on 2 cores, as long as Ray's start.
    The caller joins it before timing the machine; what fails here fails again in
    `open_tracking`, with its sentence."""
    from trainables.tracking import client_for, resolve_tracking_uri

    def open_store() -> None:
        try:
            client_for(resolve_tracking_uri(cfg.tracking_uri))
        except Exception:  # noqa: BLE001, S110 - open_tracking reports it
            pass

    # not a daemon: a store half-migrated at the interpreter's exit would not open again
    thread = threading.Thread(target=open_store, name="open-mlflow-store")
    thread.start()
    return thread


def open_tracking(cfg: SearchConfig, store: ExperimentStore, data: ImageData, split: Split,
                  resources: ResourcePlan) -> SearchRun:
    """The search's MLflow parent run (a continued search reopens its own); a new search's
    data report is written before any training, into the folder and the run."""
    from search.tracking import search_params

    log.info("data: %d images, %d classes, %d px; split train/val/test %s (hash %s)",
             len(data.labels), data.num_classes, data.images.shape[1],
             "/".join(str(v) for v in split.sizes().values()), split.hash)
    log.info("resources: %s", resources.describe())
    tracking = SearchRun.open(cfg.tracking_uri, cfg.experiment, store,
                              search_params(cfg.flat_dict(), data.facts(), split))
    log.info("MLflow: %s (experiment %r); see it with: mlflow ui --backend-store-uri %s",
             tracking.uri, cfg.experiment, tracking.uri)
    if tracking.created:
        data_report(cfg, store, tracking)
    return tracking


def data_report(cfg: SearchConfig, store: ExperimentStore, tracking: SearchRun) -> None:
    """Writes the data report into the experiment folder, logs it, warns about findings."""
    from trainables.eda import data_report as write_report
    from trainables.eda import findings, split_parts

    start, out = time.time(), store.data_report_dir
    report = write_report(cfg.data, out, image_col=cfg.image_col, label_col=cfg.label_col,
                          parts=split_parts(store.read_split_doc()))
    tracking.client.log_artifacts(tracking.run_id, str(out), "data_report")
    for line in findings(report):
        log.warning("data report: %s", line)
    log.info("data report: %s (%.1f s)", out / "report.md", time.time() - start)


def place_data(data: ImageData):
    """The decoded data in Ray's object store, once: every trial and job reads it zero-copy."""
    import ray

    return ray.put(data)


# ---------------------------------------------------------------------- starts


def make_starts(cfg: SearchConfig, store: ExperimentStore, data_ref, split: Split,
                starts: dict[str, Start], tracking: SearchRun, clock: Clock) -> dict[str, Start]:
    """The shared start of each architecture: warm starts trained now when the search needs
    them, every start saved as its init file."""
    from search.start import needs_warm_start, warm_starts, write_starts

    if needs_warm_start(cfg, starts):
        say = clock.say("warm start")
        say("training the shared start every trial fine-tunes from")
        starts, reports = warm_starts(cfg, store, data_ref, split, starts, progress=say)
        for model, curve in reports.items():
            tracking.log_stage("warm-start", curve, starts[model].record())
    write_starts(store, starts)
    return starts


# ---------------------------------------------------------------------- trials


def search_deadline(clock: Clock, budget: BudgetPlan | None) -> float | None:
    """Seconds Tune may run trials, counted from now (the warm start has used its share): what
    the budget plan gives the search, keeping the refit's time free."""
    if budget is None:
        return None
    left = clock.seconds_left() - budget.refit_s / SLACK - budget.end_s
    return max(10.0, min(budget.search_s, left))


def trials(cfg: SearchConfig, store: ExperimentStore, resources: ResourcePlan,
           data: ImageData, split: Split, data_ref, starts: dict[str, Start],
           tracking: SearchRun, seconds: float | None, clock: Clock, *,
           resumed: bool) -> pd.DataFrame | None:
    """Runs the trials still to run on Ray Tune (Optuna proposes, ASHA stops weak ones) within
    `seconds`; returns the results table, or None when the search was interrupted."""
    from search.results import ProgressPrinter, ResultsWriter, settle
    from search.resume import continuation, fresh
    from search.tune import make_trainable, make_tuner, place_inputs

    deadline = math.inf if seconds is None else time.time() + seconds - 1.0
    ended_for_time = False
    cont = continuation(store) if resumed else fresh()
    if resumed:
        log.info("continuing %s: %d trial(s) ended and are kept, %d interrupted one(s) run again "
                 "(from their last finished epoch), %d trial(s) to go", store.dir, cont.count,
                 len(cont.pending), max(0, cfg.num_samples - cont.count))
    if cfg.num_samples > cont.count or cont.pending:
        trainable = make_trainable(cfg, resources, place_inputs(data_ref, split, starts), store)
        recorder = tracking.trial_recorder(trial_params(cfg, resources, starts),
                                           data.class_names, data.labels[split.val].tolist())
        callbacks = [recorder, ResultsWriter(store, cfg.train.metric, cont.ended),
                     ProgressPrinter(cfg.num_samples, cont.count, clock=clock,
                                     metric=cfg.train.metric)]
        searcher, tuner = make_tuner(cfg, resources, trainable, callbacks, cont, store,
                                     time_budget_s=seconds)
        tuner.fit()
        ended_for_time = searcher.out_of_time
    out_of_time = time.time() >= deadline or ended_for_time
    table = settle(store, out_of_time)
    tracking.close_open_trial_runs(table)
    if not out_of_time and unfinished(cfg, table):
        log.warning("search interrupted: %d of %d trials finished; continue it with "
                    "python -m search.run --resume --experiment %s --storage %s",
                    int(table["status"].isin(FINISHED).sum()), cfg.num_samples, cfg.experiment,
                    cfg.storage)
        return None
    return table


def trial_params(cfg: SearchConfig, resources: ResourcePlan, starts: dict[str, Start]) -> dict:
    """What every trial's MLflow run records besides its own config: the fixed training
    settings, the image size, the shared start and the resources."""
    from search.tune import trial_train_config

    fixed = {k: v for k, v in dataclasses.asdict(trial_train_config(cfg, resources)).items()
             if k not in cfg.space}
    first = next(iter(starts.values()))
    return fixed | {"image_size": cfg.resolved_image_size, "init": first.kind,
                    "workers_per_trial": resources.workers,
                    "cpus_per_worker": resources.cpus_per_worker,
                    "gpus_per_worker": resources.gpus_per_worker}


def unfinished(cfg: SearchConfig, table: pd.DataFrame) -> bool:
    """Trials left unfinished, or fewer trials than asked, mean an interruption."""
    ended = table["status"].isin(ENDED)
    return not ended.all() or len(table) < cfg.num_samples


# ---------------------------------------------------------------------- selection


@dataclass
class Selection:
    """The trial val chose: its row of the results table, its checkpoint, its val figures;
    the table it was chosen from, and a multi-objective search's Pareto front."""

    table: pd.DataFrame
    row: dict[str, Any]
    checkpoint: Checkpoint
    path: str
    val: dict[str, float]
    front: list[dict] | None


def select(cfg: SearchConfig, store: ExperimentStore, table: pd.DataFrame, data: ImageData,
           tracking: SearchRun) -> Selection:
    """The best finished trial by val (the table printed best first), except that the
    recommended recipe stays the choice unless val says clearly that another is better (see
    `_recipe_unless_clearly_beaten`); the search's pictures and Pareto front are drawn here too.
    A UserError when no trial finished."""
    from search.results import print_table

    table = ranked(table, cfg.train.metric)
    usable = table[table["status"].isin(FINISHED) & (table["checkpoint"] != "")]
    print_table(table)
    if usable.empty:
        tracking.end("FAILED")
        raise UserError(f"no trial of {cfg.experiment!r} finished{_first_error(store)}; fix "
                        "the cause and run again (results.csv and the trial errors above say "
                        "more)")
    best = _recipe_unless_clearly_beaten(cfg, usable, data, _recipe_trial(cfg, store))
    val = {"accuracy": float(best["best_val_acc"]), "loss": float(best["best_val_loss"]),
           "f1": float(best["best_val_f1"])}
    return Selection(table, best.to_dict(), Checkpoint.load(best["checkpoint"]),
                     best["checkpoint"], val, _pictures_and_front(cfg, store, tracking))


def _recipe_trial(cfg: SearchConfig, store: ExperimentStore) -> str | None:
    """The trial id of the recommended recipe: the study's first trial, when the search
    started with it."""
    from search.study import load_study

    study = load_study(store) if cfg.start_with_default else None
    return study.trials[0].user_attrs.get("trial_id") if study and study.trials else None


def _recipe_unless_clearly_beaten(cfg: SearchConfig, usable: pd.DataFrame, data: ImageData,
                                  recipe_id: str | None) -> pd.Series:
    """The top row of `usable` (ranked), or the recommended recipe's row when the top trial
    leads it on val accuracy by no more than one standard error of the paired difference: of
    the val images exactly one of the two gets right (b for the leader, c for the recipe), the
    lead b - c against sqrt(b + c).

    A few hundred val images cannot tell apart configurations a few images apart, and the
    recipe is the better bet then: it is the one measured over the whole suite. On clothing
    photos flips only led light augmentation by 1 val image of 341, and its refit made 2.7
    points more test errors than the recipe's (RESULTS.md §0d)."""
    best = usable.iloc[0]
    if recipe_id is None or cfg.train.metric != "accuracy" or "," in cfg.objective:
        return best
    recipe = usable[usable["trial_id"] == recipe_id]
    if recipe.empty or recipe.index[0] == best.name:
        return best
    top, base = Checkpoint.load(best["checkpoint"]), Checkpoint.load(recipe.iloc[0]["checkpoint"])
    if top.val_probs is None or base.val_probs is None or \
            not np.array_equal(top.val_indices, base.val_indices):
        return best
    y = data.labels[top.val_indices]
    right_top, right_base = top.val_probs.argmax(1) == y, base.val_probs.argmax(1) == y
    b, c = int((right_top & ~right_base).sum()), int((~right_top & right_base).sum())
    if b - c > math.sqrt(b + c):
        return best
    log.info("trial %s leads the recommended recipe (trial %s) on val by %d image(s) of %d, "
             "within one standard error (%.1f): the recipe stays the choice", best["trial_id"],
             recipe.iloc[0]["trial_id"], b - c, len(y), math.sqrt(b + c))
    return recipe.iloc[0]


def _pictures_and_front(cfg: SearchConfig, store: ExperimentStore,
                        tracking: SearchRun) -> list[dict] | None:
    """The study's pictures (plots/, and in the parent run); for a multi-objective search the
    Pareto front, printed and saved as pareto.csv."""
    from search.study import describe_front, draw, objective_names, pareto_front

    for path in draw(cfg, store):
        tracking.client.log_artifact(tracking.run_id, str(path), "plots")
    front = pareto_front(cfg, store)
    if front is None:
        return None
    names = objective_names(cfg)
    log.info("Pareto front (%s), %d trial(s), saved as %s:\n%s", " against ".join(names),
             len(front), store.path("pareto.csv"), describe_front(front, names))
    tracking.client.log_artifact(tracking.run_id, str(store.path("pareto.csv")))
    return front[["trial_id", *names]].to_dict("records")


def _first_error(store: ExperimentStore) -> str:
    """': trial X failed with <its last error line>', from Tune's error files, if any."""
    for path in sorted(store.ray_dir.glob("trial_*/error.txt")):
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return f": trial {path.parent.name.removeprefix('trial_')} failed with {lines[-1]}"
    return ""


# ---------------------------------------------------------------------- refit


def refit(cfg: SearchConfig, store: ExperimentStore, data_ref, split: Split,
          starts: dict[str, Start], chosen: Selection, tracking: SearchRun, clock: Clock,
          budget: BudgetPlan | None):
    """The chosen configuration retrained on train + val (`search.refit`), or None when it is
    off or the budget has no time left for it."""
    from search.refit import refit as train_refit

    if not cfg.refit:
        return None
    left = clock.seconds_left()
    if left is not None and budget is not None and left < budget.refit_s * 0.8:
        log.warning("no time left in --time-budget %s for the refit (%.0f s left, it needs about "
                    "%.0f s): the val-selected trial is the final model", cfg.time_budget,
                    max(left, 0), budget.refit_s)
        return None
    train_cfg = chosen.checkpoint.train_config
    if left is not None:  # what the search left over stretches the refit, within REFIT_STRETCH
        most = math.ceil(train_cfg.epochs * REFIT_STRETCH)
        train_cfg = fit_to_clock(train_cfg, clock, min(most, epochs_cap(cfg)),
                                 budget.end_s if budget else FINISH_S)
    say = clock.say("refit")
    say("training the chosen configuration on train + val")
    done = train_refit(store, data_ref, split, starts, train_cfg, progress=say)
    if done.reports:
        tracking.log_stage("refit", done.reports, done.record)
    return done


def recipe(cfg: SearchConfig, store: ExperimentStore, data_ref, split: Split,
           starts: dict[str, Start], tracking: SearchRun, clock: Clock,
           budget: BudgetPlan | None = None):
    """--recipe-only (or a budget that fits no search): the recommended recipe, trained once on
    train + val on the whole machine, as a user's own script would; it is the final model."""
    from search.refit import refit as train_refit

    fixed = {k: v for k, v in cfg.space.items() if k in cfg.train.__dataclass_fields__}
    train_cfg = dataclasses.replace(cfg.train, **fixed)
    if clock.budget_s is not None:
        train_cfg = fit_to_clock(train_cfg, clock, epochs_cap(cfg),
                                 budget.end_s if budget else FINISH_S)
    say = clock.say("recipe")
    say("training the recommended recipe on train + val (no search)")
    done = train_refit(store, data_ref, split, starts, train_cfg, progress=say,
                       what="the recommended recipe (no search)")
    if done.reports:
        tracking.log_stage("recipe", done.reports, done.record)
    return done


def fit_to_clock(train_cfg: TrainConfig, clock: Clock, cap: int,
                 end_s: float = FINISH_S) -> TrainConfig:
    """`train_cfg` with a deadline: the budget's end less `end_s`, the time the run's end needs
    (test predictions, reports, records: the plan's estimate). A plan's length is an estimate
    from a short timing; the run fits it to the time left as measured on its first epochs,
    within `cap` epochs (never under its own)."""
    return dataclasses.replace(train_cfg, fit_by=time.time() + clock.seconds_left() - end_s,
                               fit_cap=max(cap, train_cfg.epochs))


# ---------------------------------------------------------------------- test


@dataclass
class Tested:
    """Test figures of the val-selected trial and of the final model (the refit, else that
    trial), with the final model's test probabilities; test is used here once, to report."""

    trial: dict[str, float] | None  # None: --recipe-only, no trial
    final: dict[str, Any]  # {"model": "refit" | "best trial", "checkpoint", "test"}
    final_probs: np.ndarray


def test(data: ImageData, split: Split, chosen: Selection | None, final) -> Tested:
    """Each model predicts test as it will when loaded: averaged over the views its own
    training made label-preserving (models.predict.AUTO), as ensemble.build does by default."""
    from models import load_model
    from models.predict import AUTO, predict

    def evaluate(source) -> tuple[dict[str, float], np.ndarray]:
        model, ckpt = load_model(source, torch.device("cpu"))
        probs = predict(model, data.images[split.test], ckpt, [AUTO])
        return classification_metrics(probs, data.labels[split.test]), probs

    trial, probs = evaluate(chosen.checkpoint) if chosen else (None, None)  # None: recipe
    if final is None:
        return Tested(trial, {"model": "best trial", "checkpoint": chosen.row["checkpoint"],
                              "test": trial}, probs)
    final_test, final_probs = evaluate(final.path)
    return Tested(trial, {"model": "refit", "checkpoint": final.record["checkpoint"],
                          "test": final_test}, final_probs)


# ---------------------------------------------------------------------- explain, register


def explain(store: ExperimentStore, data: ImageData, split: Split, chosen: Selection | None,
            final, tracking: SearchRun) -> None:
    """The best trial's model report on val, in the experiment folder and the parent run; a
    --recipe-only run's (whose model has trained on val) on test."""
    from models.explain import explain_checkpoint, explain_ensemble
    from models.predict import load

    name = "best_trial" if chosen is not None else "recipe"
    start, out = time.time(), store.model_report_dir(name)
    if chosen is not None:
        explain_checkpoint(chosen.path, data, out, "best trial")
    else:
        explain_ensemble(load(final.path), data, split.test, out, "recipe (on test images)")
    tracking.client.log_artifacts(tracking.run_id, str(out), f"model_report/{name}")
    log.info("model report: %s (%.1f s)", out / "report.md", time.time() - start)


def register(cfg: SearchConfig, store: ExperimentStore, data: ImageData, split: Split,
             tested: Tested, tracking: SearchRun) -> int | None:
    """With --register, the final model as a new registered version; returns the version."""
    if not cfg.register:
        return None
    from models.pyfunc import describe
    from models.pyfunc import register as register_model

    final = tested.final
    version = register_model(store.resolve(final["checkpoint"]), name=cfg.register,
                             uri=tracking.uri, run_id=tracking.run_id,
                             examples=data.images[split.test[:2]],
                             description=describe(final["model"], cfg.experiment,
                                                  data.class_names, final["test"]))
    log.info("registered %r version %d (%s); serve it with: MLFLOW_TRACKING_URI=%s mlflow "
             "models serve -m models:/%s/%d --env-manager local", cfg.register, version,
             final["model"], tracking.uri, cfg.register, version)
    return version


# ---------------------------------------------------------------------- summary


def summary(cfg: SearchConfig, store: ExperimentStore, data: ImageData, split: Split,
            starts: dict[str, Start], budget: BudgetPlan | None, chosen: Selection | None, final,
            tested: Tested, registered: int | None, tracking: SearchRun, clock: Clock) -> None:
    """summary.json, the parent run's result (test figures, confusion matrix, files), and the
    closing lines."""
    from search.start import starts_record

    trial = chosen.row["trial_id"] if chosen else None
    store.write_summary({
        "experiment": cfg.experiment, "recipe_only": cfg.recipe_only,
        "best_trial": chosen.row | {"checkpoint": store.relative(chosen.path)} if chosen else None,
        "val": chosen.val if chosen else None, "test": tested.trial,
        "refit": final.record | {"test": tested.final["test"]} if final else None,
        "final": tested.final | {"checkpoint": store.relative(tested.final["checkpoint"])},
        "start": starts_record(starts), "budget": budget.__dict__ if budget else None,
        "pareto": chosen.front if chosen else None, "registered": registered,
        "split_hash": split.hash, "split_sizes": split.sizes(), "data": data.facts(),
        "trials": chosen.table["status"].value_counts().to_dict() if chosen else {},
        "wall_s": round(clock.elapsed(), 1), "mlflow": store.read_tracking(follow=False),
        "code": code_version(),
    })
    metrics = {f"test_{k}": v for k, v in tested.final["test"].items()}
    if chosen:
        metrics |= {f"trial_test_{k}": v for k, v in tested.trial.items()} | {
            f"best_val_{k}": v for k, v in chosen.val.items()}
    tracking.log_result(metrics, trial, tested.final_probs, data.labels[split.test],
                        data.class_names)
    tracking.end("FINISHED")
    lines = []
    if chosen:
        lines.append(f"\nbest trial {trial} (chosen on val, {cfg.train.metric}): val accuracy "
                     f"{chosen.val['accuracy']:.4f}, test accuracy "
                     f"{tested.trial['accuracy']:.4f} (macro-F1 {tested.trial['f1']:.4f}) on "
                     f"{len(split.test)} test images")
    if final:
        r, t = final.record, tested.final["test"]
        what = "the recommended recipe (no search)" if chosen is None else "refit"
        lines.append(f"{what} on train + val ({r['train_images']} images, final model): test "
                     f"accuracy {t['accuracy']:.4f} (macro-F1 {t['f1']:.4f}) on "
                     f"{len(split.test)} test images, {r['checkpoint']}")
    lines.append(f"{clock.elapsed():.0f} s in all; results: {store.path('summary.json')}")
    log.info("\n".join(lines))
