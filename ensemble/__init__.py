"""Ensembles of the best trials: soft/hard/weighted voting and model soups, reported honestly.

`ensemble.load` reads any saved model (it is `models.load`, kept here for the README's
`import ensemble; ensemble.load(...)`).
"""

from models import EnsembleModel, load

__all__ = ["EnsembleModel", "load"]
