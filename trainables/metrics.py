"""Classification metrics over probability arrays (numpy), and a confusion-matrix figure."""

from __future__ import annotations

import numpy as np


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and mean negative log-likelihood of (N, C) probabilities.

    Plain numpy on purpose: it runs in every trial epoch, and importing sklearn.metrics would add
    about 0.7 s to each fresh trial process. Macro-F1 counts a class absent from both labels
    and predictions as 0, like sklearn's `f1_score(..., labels=range(C), zero_division=0)`.
    """
    labels = np.asarray(labels)
    num_classes = probs.shape[1]
    pred = probs.argmax(1)
    eps = 1e-12
    nll = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0)).mean())
    tp = np.bincount(labels[pred == labels], minlength=num_classes).astype(float)
    support = np.bincount(labels, minlength=num_classes)
    predicted = np.bincount(pred, minlength=num_classes)
    denom = support + predicted  # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (support + predicted)
    f1 = np.divide(2 * tp, denom, out=np.zeros(num_classes), where=denom > 0)
    return {
        "accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
        "f1": float(f1.mean()),
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
