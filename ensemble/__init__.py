"""Ensembles of the best trials: soft/hard/weighted voting and model soups, reported honestly."""

from ensemble.predict import EnsembleModel, load

__all__ = ["EnsembleModel", "load"]
