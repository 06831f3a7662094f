"""Classification metrics over probability arrays (plain numpy; scikit-learn does the work)."""

from __future__ import annotations

import numpy as np


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and mean negative log-likelihood of (N, C) probabilities."""
    from sklearn.metrics import accuracy_score, f1_score

    pred = probs.argmax(1)
    eps = 1e-12
    nll = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0)).mean())
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "f1": float(f1_score(labels, pred, average="macro",
                             labels=np.arange(probs.shape[1]), zero_division=0)),
        "loss": nll,
    }


def confusion_figure(probs: np.ndarray, labels: np.ndarray, class_names: list[str], title: str):
    """A matplotlib figure of the confusion matrix (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        labels, probs.argmax(1), labels=np.arange(len(class_names)), display_labels=class_names,
        ax=ax, colorbar=False, xticks_rotation="vertical")
    ax.set_title(title)
    fig.tight_layout()
    return fig
