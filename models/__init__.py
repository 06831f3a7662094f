"""The models layer: any saved model, loaded, run and explained.

Below the search and the ensembles, above the training loop (`trainables`): the file formats of
saved models (`models.artifact`; a checkpoint's own format is `trainables.checkpoint`, since the
training loop writes it), rebuilding a network from one, prediction with test-time augmentation,
the loaded ensemble, votes, the model report (errors, Grad-CAM) and the MLflow pyfunc.
"""

from models.artifact import Vote, load_model, read
from models.predict import EnsembleModel, load

__all__ = ["EnsembleModel", "Vote", "load", "load_model", "read"]
