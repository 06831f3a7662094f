"""The search as the Optuna study in optuna.db sees it: the Pareto front of an accuracy-against-
cost search, and pictures (optimisation history, parameter importances, parallel coordinates,
the Pareto front) drawn with Optuna's matplotlib visualisation, no browser needed."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import pandas as pd

from search.config import SearchConfig
from search.resume import STUDY, study_storage
from trainables.store import ExperimentStore

log = logging.getLogger("search")


def load_study(store: ExperimentStore):
    """The search's study, or None when no trial was ever proposed."""
    import optuna

    if not store.path("optuna.db").is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=STUDY, storage=study_storage(store))
    except KeyError:
        return None


def objective_names(cfg: SearchConfig) -> list[str]:
    from search.tune import objectives

    metrics, _ = objectives(cfg)
    return metrics if isinstance(metrics, list) else [metrics]


def pareto_front(cfg: SearchConfig, store: ExperimentStore) -> pd.DataFrame | None:
    """A multi-objective search's Pareto-optimal trials, read back from the study, with their
    results-table rows; written to pareto.csv. None for a single-objective search."""
    names = objective_names(cfg)
    study = load_study(store)
    if len(names) < 2 or study is None:
        return None
    rows = [{"trial_id": t.user_attrs.get("trial_id", ""), "optuna_number": t.number,
             **dict(zip(names, t.values))} for t in study.best_trials]
    front = pd.DataFrame(rows).sort_values(names[1]).reset_index(drop=True)
    if store.has_results() and len(front):
        table = store.read_results().drop(columns=[n for n in names if n != "trial_id"],
                                          errors="ignore")
        front = front.merge(table, on="trial_id", how="left")
        front["checkpoint"] = [store.relative(c) if isinstance(c, str) and c else ""
                               for c in front.get("checkpoint", [""] * len(front))]
    from trainables.files import atomic_write

    atomic_write(store.path("pareto.csv"), front.to_csv(index=False))
    return front


def describe_front(front: pd.DataFrame, names: list[str]) -> str:
    cols = ["trial_id", *names] + [c for c in ("model", "lr", "batch_size") if c in front]
    return front[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")


def draw(cfg: SearchConfig, store: ExperimentStore) -> list[Path]:
    """The study's pictures as PNG files in plots/; a picture the study cannot support yet (too
    few finished trials for importances, say) is left out with a log line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as vis
    from optuna.exceptions import ExperimentalWarning

    study = load_study(store)
    if study is None:
        return []
    names = objective_names(cfg)
    first = (lambda t: t.values[0]) if len(names) > 1 else None
    pictures = {
        "optimization_history": lambda: vis.plot_optimization_history(
            study, target=first, target_name=names[0]),
        # fANOVA: how much of the score's variance each parameter explains, whatever the direction
        "param_importances": lambda: vis.plot_param_importances(
            study, target=first, target_name=names[0],
            evaluator=optuna.importance.FanovaImportanceEvaluator(seed=cfg.seed)),
        "parallel_coordinate": lambda: vis.plot_parallel_coordinate(
            study, target=first, target_name=names[0]),
    }
    if len(names) > 1:
        pictures["pareto_front"] = lambda: vis.plot_pareto_front(study, target_names=names)
    out = store.path("plots")
    out.mkdir(exist_ok=True)
    written, tick = [], time.perf_counter()
    for name, plot in pictures.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                # a parameter with one value so far gives matplotlib a zero-height axis: it
                # widens it and warns, which is noise to the user
                warnings.simplefilter("ignore", UserWarning)
                ax = plot()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("plot %s left out: %s", name, str(exc).splitlines()[0][:120])
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(out / f"{name}.png")
    if written:
        log.info("pictures of the search: %s (%.1f s)", out, time.perf_counter() - tick)
    return written
