"""Resuming (--resume) and extending (--extend N) a search from plain data.

What a search needs to continue is kept as data, never as pickles: results.csv (the trials that
ended), the Optuna study in optuna.db (the sampler's whole history), and each trial's folder
(trial.json with its config, resume.pt with its last finished epoch). A planted file in a shared
experiment folder is therefore never run as code. A continued search is a fresh Tune run: trials
that ended are kept as they are, interrupted ones are proposed again first and pick up their
folder (and so their last finished epoch and their MLflow run), and the sampler goes on from the
study's history.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import pandas as pd

from trainables.store import ENDED, ExperimentStore

log = logging.getLogger("search")
STUDY = "search"  # the Optuna study's name in optuna.db


def study_storage(store: ExperimentStore):
    """The Optuna storage of a search: sqlite in its experiment folder, written by the driver."""
    import optuna

    url = f"sqlite:///{store.path('optuna.db')}"
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})


def config_key(config: dict) -> str:
    """A trial's identity across a restart: its Tune config, canonically written."""
    return json.dumps(config, sort_keys=True, default=str)


@dataclass
class Continuation:
    """What a continued search keeps and what it runs again."""

    ended: pd.DataFrame  # rows of trials that ended: kept, never run again
    pending: list[dict] = field(default_factory=list)  # params of interrupted trials, first
    adopt: dict[str, str] = field(default_factory=dict)  # config key -> old trial id

    @property
    def count(self) -> int:
        return len(self.ended)


def fresh() -> Continuation:
    return Continuation(ended=pd.DataFrame())


def continuation(store: ExperimentStore) -> Continuation:
    """Reads what an interrupted (or finished, for --extend) search left: its ended trials, the
    params of trials the study still marks running (marked failed now, proposed again), and the
    folders of unfinished trials by config, for the rerun to adopt."""
    table = store.read_results() if store.has_results() else pd.DataFrame()
    ended = table[table["status"].isin(ENDED)] if not table.empty else table
    done = set(ended["trial_id"]) if not ended.empty else set()
    adopt = {}
    for doc in store.trial_records():
        if doc["trial_id"] not in done:
            adopt[config_key(doc["config"])] = doc["trial_id"]
    store.write_adoptions(adopt)
    return Continuation(ended=ended.reset_index(drop=True), pending=_interrupted_params(store),
                        adopt=adopt)


def _interrupted_params(store: ExperimentStore) -> list[dict]:
    """Params of the study's trials still marked running (the driver stopped before Tune told
    the study how they ended), then of those enqueued that never started (a search's first
    points); they are marked failed and proposed again, in that order. (Left waiting, an
    enqueued trial would be served before the interrupted ones proposed again.)"""
    import optuna
    from optuna.trial import TrialState

    if not store.path("optuna.db").is_file():
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=STUDY, storage=study_storage(store))
    except KeyError:  # the database exists but no trial was ever proposed
        return []
    pending, waiting = [], []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
            pending.append(dict(t.params))
        else:
            waiting.append(dict(t.system_attrs.get("fixed_params", {})))
    for _ in waiting:  # ask() starts the oldest waiting trial: end each as failed
        study.tell(study.ask(), state=TrialState.FAIL)
    return pending + [p for p in waiting if p]


def adopt_folder(store: ExperimentStore, trial_id: str, config: dict) -> None:
    """Called in the trial: an interrupted trial of the same config left a folder (its resume
    state, its best checkpoint so far); move it under this trial's id so it continues there."""
    old = store.read_adoptions().get(config_key(config))
    target = store.checkpoint(trial_id).parent
    moved = False
    if old and old != trial_id and not target.exists():
        source = store.checkpoint(old).parent
        if source.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            moved = True
            log.info("trial %s continues interrupted trial %s", trial_id, old)
    # the folder's record names the trial that now owns it, so a second interruption finds it
    store.write_trial_record(trial_id, config, replace=moved)
