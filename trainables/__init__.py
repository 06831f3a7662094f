"""Everything one trial needs: data, split, augmentation, models, the training loop, checkpoints.

Imports neither `search` nor `ensemble`.
"""

from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.data import ImageData, load_data, read_unlabelled
from trainables.errors import UserError
from trainables.split import Split, draw_split
from trainables.train import TrainConfig, TrialInputs, fit, load_trained, predict_proba

__all__ = [
    "ImageData", "Split", "TrainConfig", "TrialInputs", "UserError", "draw_split", "fit",
    "load_checkpoint", "load_data", "load_trained", "predict_proba", "read_unlabelled",
    "save_checkpoint",
]
