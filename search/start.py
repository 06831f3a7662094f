"""The shared start every trial of a search fine-tunes from, and its normalisation."""

from __future__ import annotations

from search.config import SearchConfig
from search.experiment import Experiment
from trainables.models import create_model, initial_state, normalization


def shared_init(cfg: SearchConfig, exp: Experiment, num_classes: int
                ) -> tuple[dict, list[float], list[float]]:
    """The initial weights all trials share (a resumed search reads init.pt) and the mean/std
    the weights expect."""
    if exp.resumed and exp.store.has_init():
        saved = exp.store.read_init()
        return saved["model"], saved["mean"], saved["std"]
    state = initial_state(cfg.train.model, num_classes, seed=cfg.seed, pretrained=cfg.pretrained,
                          pretrained_file=cfg.pretrained_file)
    mean, std = normalization(create_model(cfg.train.model, num_classes))
    return state, mean, std
