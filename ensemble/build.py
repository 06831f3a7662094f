"""`python -m ensemble.build --top K`: the best trials (and seed retrains) as votes and soups."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensemble.combiners import (
    FOLD_COMBINERS,
    Combined,
    Pool,
    build_rows,
    choose,
    predict_members,
    recipe_rows,
    refit_rows,
    student_rows,
)
from ensemble.folds import fit_folds, fold_report, plan_folds
from ensemble.members import SearchState, open_search, retrain_seeds, top_members
from ensemble.report import log_to_mlflow, table_lines, write_report
from models.predict import AUTO, check_tta, load, predictions_frame
from trainables.cli import CommonOptions, add_options, exit_now, opt, run_main, start_ray, typed
from trainables.data import read_unlabelled
from trainables.errors import UserError
from trainables.files import atomic_write
from trainables.store import code_version
from trainables.tracking import resolve_tracking_uri

log = logging.getLogger("ensemble")


@dataclass(frozen=True)
class EnsembleConfig(CommonOptions):
    """Every option of `python -m ensemble.build`; the field help is the `--help` text."""

    top: int = opt(5, "Number of best finished trials to combine.")
    seeds: int = opt(0, "Retrain each selected trial's config with this many new seeds (on Ray) "
                     "and add them as members.")
    rounds: int = opt(25, "Rounds of greedy ensemble selection that fit the vote weights.")
    folds: int = opt(0, "Also retrain the --top configurations on K stratified folds of train + "
                     "val (test stays out), one model per configuration and fold on Ray: adds "
                     "each configuration's CV score and fold-ensemble rows whose vote weights "
                     "are fit on out-of-fold predictions (0: off).")
    group_col: str | None = opt(None, "With --folds: CSV column of groups that must stay in "
                                "one fold (default: the search's --group-col).")
    tta: list = opt([AUTO], "Test-time augmentation: auto (each model averages over a "
                    "horizontal flip where it trained with flips, else nothing), none, or views "
                    "to average over (repeatable): hflip, vflip, shift, crop. Only use views "
                    "that keep labels.", cli_list=True, metavar="VIEW")
    predict: str | None = opt(None, "Unlabelled images to predict with the chosen ensemble: a "
                              "folder or a CSV with an image column.")
    output: str | None = opt(None, "Predictions CSV to write for --predict (default: "
                             "<experiment>/ensemble/predictions.csv).")


def parse_args(argv: list[str] | None = None) -> EnsembleConfig:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble.build",
        description="Combine the best trials of a search into weighted soft votes and model "
                    "soups; every choice is made on val and every row reported on test.")
    add_options(parser, EnsembleConfig)
    values = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if "tta" in values:  # --tta hflip,shift works as well as --tta hflip --tta shift
        values["tta"] = [v for item in values["tta"] for v in item.split(",") if v]
    cfg = EnsembleConfig(**typed(EnsembleConfig, values))
    cfg.check_common()
    if cfg.seeds < 0 or cfg.rounds < 1:
        raise UserError("--seeds must not be negative and --rounds must be at least 1")
    if cfg.folds < 0 or cfg.folds == 1:
        raise UserError(f"--folds must be at least 2 (each fold's model is judged on the images "
                        f"it did not train on), not {cfg.folds}; use --folds 5, or leave it out")
    if cfg.group_col and not cfg.folds:
        raise UserError("--group-col only shapes the folds of --folds K; add --folds or leave "
                        "--group-col out")
    if cfg.output and Path(cfg.output).expanduser().is_dir():
        raise UserError(f"--output {cfg.output} is a folder; pass the path of the CSV file to "
                        f"write, e.g. {Path(cfg.output) / 'predictions.csv'}")
    return dataclasses.replace(cfg, tta=check_tta(cfg.tta))


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: build(parse_args(argv)))


def build(cfg: EnsembleConfig) -> int:
    start = time.time()
    state = open_search(cfg.storage, cfg.experiment)
    lock = state.store.lock()  # noqa: F841 - held while building: no search may write meanwhile
    recipe = state.config.recipe_only
    if recipe:
        _check_recipe(cfg, state)
    members = [] if recipe else top_members(state, cfg.top)
    plan = plan_folds(state, cfg.folds, cfg.group_col) if cfg.folds else None  # fail early
    to_predict = None
    if cfg.predict:  # read first: a bad path must fail before any work is done
        to_predict = read_unlabelled(cfg.predict, image_size=int(state.data.images.shape[1]),
                                     image_col=cfg.image_col)
    uri, parent = _tracking(cfg, state)  # a store that is gone fails here, before any work
    out = state.store.ensemble_dir
    out.mkdir(exist_ok=True)
    if recipe:
        rows, folds = recipe_rows(state, cfg.tta), None
        chosen = rows[0]
    else:
        members, rows, folds = _rows(cfg, state, members, plan)
        chosen = choose(rows, state.store.metric, len(state.split.val))
    saved = out / "ensemble.pt"
    chosen.artifact.save(saved)
    for r in rows:
        if r.artifact is not None and r.name.endswith("soup"):
            r.artifact.save(out / f"{r.name.replace(' ', '_')}.pt")
    y_test = state.data.labels[state.split.test]
    predictions_frame([state.data.ids[i] for i in state.split.test], chosen.test_probs,
                      state.data.class_names, y_test).to_csv(out / "test_predictions.csv",
                                                             index=False)
    doc = _report_doc(cfg, state, members, rows, chosen)
    if folds is not None:
        doc |= fold_report(state, folds, state.store.metric)
    doc["final"] = _final(state, saved, chosen)
    write_report(out, doc, rows, chosen)
    _record_final(state, doc["final"])
    run_id = log_to_mlflow(uri, cfg.experiment, parent, doc, rows, out)
    _explain_and_register(cfg, state, saved, chosen, uri, run_id)
    print("\n" + "\n".join(table_lines(rows, chosen)), flush=True)
    if to_predict is not None:
        _write_predictions(cfg, saved, to_predict, out)
    log.info("\nchosen on val: %s; saved %s; report %s; MLflow run %s; %.0f s", chosen.name,
             saved, out / "report.md", run_id, time.time() - start)
    return 0


def _rows(cfg: EnsembleConfig, state: SearchState, members, plan):
    """The fold models and seed retrains (on Ray), the members' predictions, and every row:
    the refit, the votes and soups, the fold rows and the students. Returns the members (seed
    retrains added), the rows and the folds (None without --folds)."""
    folds = None
    if plan is not None:  # the top configurations, before seed retrains join the members
        folds = fit_folds(state, plan, members, cfg.tta, address=cfg.address,
                          num_cpus=cfg.num_cpus)
    if cfg.seeds:
        members += _retrain(cfg, state, members)
    log.info("members: %s", ", ".join(f"{m.name} (val {m.val_acc:.4f})" for m in members))
    pool = Pool(state, predict_members(state, members, cfg.tta), cfg.tta, cfg.rounds,
                state.store.metric, folds=folds)
    rows = refit_rows(pool) + build_rows(pool) + \
        (build_rows(pool, FOLD_COMBINERS) if folds else []) + student_rows(pool)
    return members, rows, folds


def _check_recipe(cfg: EnsembleConfig, state: SearchState) -> None:
    """A --recipe-only experiment has one model and no trials: it can be reported, explained,
    registered and predict with, but not retrained by seed or fold."""
    if cfg.seeds or cfg.folds:
        raise UserError(f"experiment {state.experiment!r} trained the recommended recipe only "
                        "(--recipe-only, or a --time-budget that fitted no search), so it has no "
                        "trials for --seeds or --folds to retrain; leave them out, or run a "
                        "search with a larger --time-budget in a new --experiment")
    log.info("experiment %r trained the recommended recipe only (no trials): its one model "
             "is the answer, reported on test", state.experiment)


def _final(state: SearchState, saved: Path, chosen: Combined) -> dict:
    """The product's one answer: the row chosen on val (the refit among the rows)."""
    return {"model": "refit" if chosen.name == "refit" else f"ensemble ({chosen.name})",
            "checkpoint": state.store.relative(saved),
            "chosen_by": "recipe only: the one model" if state.config.recipe_only
            else "ensemble.build, on val",
            "members": chosen.members, "test": chosen.test}


def _record_final(state: SearchState, final: dict) -> None:
    """summary.json names the same final model as the ensemble's report; what the search alone
    had chosen stays under search_final."""
    summary = state.store.read_summary()
    if summary is None:
        return
    summary.setdefault("search_final", summary.get("final"))
    summary["final"] = final
    state.store.write_summary(summary)
    log.info("final model: %s, test accuracy %.4f (summary.json and the ensemble report agree)",
             final["model"], final["test"]["accuracy"])


def _explain_and_register(cfg: EnsembleConfig, state: SearchState, saved: Path,
                          chosen: Combined, uri: str, run_id: str) -> None:
    """The chosen ensemble's model report, and with --register its registered version, both
    in the experiment folder and the ensemble's MLflow run."""
    from models.explain import explain_ensemble
    from trainables.tracking import client_for

    start, out = time.time(), state.store.model_report_dir("ensemble")
    recipe = state.config.recipe_only  # its model has trained on val: reported on test
    explain_ensemble(load(saved), state.data, state.split.test if recipe else state.split.val,
                     out, f"ensemble ({chosen.name})" + (" on test images" if recipe else ""))
    client_for(uri).log_artifacts(run_id, str(out), "model_report/ensemble")
    log.info("model report: %s (%.1f s)", out / "report.md", time.time() - start)
    if cfg.register:
        from models.pyfunc import describe, register

        version = register(saved, name=cfg.register, uri=uri, run_id=run_id,
                           examples=state.data.images[state.split.test[:2]],
                           description=describe(f"ensemble ({chosen.name})", cfg.experiment,
                                                state.data.class_names, chosen.test))
        log.info("registered %r version %d; serve it with: MLFLOW_TRACKING_URI=%s mlflow models "
                 "serve -m models:/%s/%d --env-manager local", cfg.register, version, uri,
                 cfg.register, version)


def _retrain(cfg: EnsembleConfig, state: SearchState, members):
    import ray

    owns = start_ray(cfg.address, cfg.num_cpus)
    try:
        return retrain_seeds(state, members, cfg.seeds)
    finally:
        if owns:
            ray.shutdown()


def _write_predictions(cfg: EnsembleConfig, saved: Path, data: tuple[np.ndarray, list[str]],
                       out: Path) -> None:
    images, ids = data
    model = load(saved)
    frame = predictions_frame(ids, model.predict_proba(images), model.class_names)
    dest = Path(cfg.output) if cfg.output else out / "predictions.csv"
    atomic_write(dest, frame.to_csv(index=False))
    log.info("predictions for %d images: %s", len(ids), dest)


def _report_doc(cfg: EnsembleConfig, state: SearchState, members, rows: list[Combined],
                chosen: Combined) -> dict:
    return {"experiment": cfg.experiment, "top": cfg.top, "seeds": cfg.seeds, "tta": cfg.tta,
            "split_hash": state.split.hash, "split_sizes": state.split.sizes(),
            "members": [{"name": m.name, "checkpoint": state.store.relative(m.checkpoint),
                         "trial_id": m.trial_id, "seed": m.seed, "val_acc": m.val_acc}
                        for m in members],
            "rows": [r.record() for r in rows], "chosen": chosen.name, "code": code_version()}


def _tracking(cfg: EnsembleConfig, state: SearchState) -> tuple[str, str | None]:
    doc = state.store.read_tracking(follow=not cfg.tracking_uri) or {}
    uri = resolve_tracking_uri(cfg.tracking_uri) if cfg.tracking_uri else \
        doc.get("tracking_uri") or resolve_tracking_uri(None)
    return uri, doc.get("parent_run_id")


if __name__ == "__main__":
    exit_now(main())
