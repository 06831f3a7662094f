"""The model report: where a model goes wrong on val, and where it looks.

The most-confused class pairs, a gallery of the highest-loss val images with their true and
predicted labels, and Grad-CAM overlays for the worst of them (Selvaraju et al. 2017: the last
feature map, weighted by the mean gradient of the predicted class's logit over it). `search.run`
writes it for the best trial and `ensemble.build` for the chosen ensemble (a vote's map is the
weighted mean of its members' maps); both log it to their MLflow run.

Grad-CAM here is a forward hook and a gradient, about twenty lines; the `grad-cam` package installs
cleanly with our torch (1.5.7), but would be a dependency for what those lines do.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainables.augment import normalize
from trainables.eda import pyplot as _pyplot
from trainables.eda import save_figure as _save
from trainables.files import atomic_write, write_json

log = logging.getLogger(__name__)
PAIRS, GALLERY, CAMS = 10, 16, 6  # confused pairs listed, gallery images, Grad-CAM overlays


def confused_pairs(probs: np.ndarray, labels: np.ndarray, class_names: list[str],
                   top: int = PAIRS) -> list[dict]:
    """The (true, predicted) class pairs with the most errors, most first, with the share of
    the true class's images that went that way."""
    pred = probs.argmax(1)
    wrong = pred != labels
    support = np.bincount(labels, minlength=len(class_names))
    pairs = Counter(zip(labels[wrong].tolist(), pred[wrong].tolist()))
    return [{"true": class_names[t], "predicted": class_names[p], "count": n,
             "share_of_true": round(n / support[t], 4)} for (t, p), n in pairs.most_common(top)]


def losses(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-image negative log-likelihood of the true class."""
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))


def grad_cam(model: nn.Module, images: np.ndarray, classes: np.ndarray, *,
             mean: list[float], std: list[float]) -> np.ndarray | None:
    """Grad-CAM maps (N, H, W) in [0, 1] of `classes` on uint8 NHWC `images`, or None for a
    model without a spatial feature map.

    The map is the deepest one still `map_side` wide: a CNN's last map is 1x1 at 32 px (and
    Grad-CAM there is one number), while at 224 px it is the usual 7x7 last stage.
    """
    model.eval()
    device = next(model.parameters()).device
    x = normalize(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).to(device), mean, std)
    x.requires_grad_(True)  # so every map is in the graph, even one before the first weight
    with torch.enable_grad(), _deepest_map(model, map_side(images.shape[1])) as found:
        logits = model(x)
    if not found:
        return None
    target = torch.as_tensor(classes, device=device).view(-1, 1)
    (grad,) = torch.autograd.grad(logits.gather(1, target).sum(), found[0])
    cam = F.relu((grad.mean((2, 3), keepdim=True) * found[0]).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    top = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / top).detach().cpu().numpy()


def map_side(image_side: int) -> int:
    """The smallest feature-map side Grad-CAM uses: 7 (the classic last stage), or an eighth
    of the image for small images."""
    return max(2, min(7, image_side // 8))


@contextlib.contextmanager
def _deepest_map(model: nn.Module, side: int):
    """Collects, during one forward pass, the output of the last module to finish whose output
    is a feature map at least `side` wide (a stage's output: its blocks finish before it)."""
    found: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4 and \
                min(output.shape[-2:]) >= side:
            found[:] = [output]

    handles = [m.register_forward_hook(keep) for m in model.modules() if m is not model]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def ensemble_cam(members: list[tuple[nn.Module, dict]], weights: list[float],
                 images: np.ndarray, classes: np.ndarray) -> np.ndarray | None:
    """The weighted mean of the members' Grad-CAM maps (members without a map are left out)."""
    maps, used = [], []
    for (model, ckpt), w in zip(members, weights):
        cam = grad_cam(model, images, classes, mean=ckpt.mean, std=ckpt.std)
        if cam is not None:
            maps.append(cam * w)
            used.append(w)
    return sum(maps) / sum(used) if maps else None


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map as a heat colour over the image (uint8 HxWx3)."""
    from matplotlib import colormaps

    heat = colormaps["jet"](cam)[..., :3] * 255
    return (0.55 * image + 0.45 * heat).round().clip(0, 255).astype(np.uint8)


def model_report(members: list[tuple[nn.Module, dict]], weights: list[float],
                 probs: np.ndarray, images: np.ndarray, labels: np.ndarray,
                 class_names: list[str], ids: list[str], out_dir: str | Path,
                 title: str) -> dict:
    """Writes report.json, report.md, errors.png and gradcam.png to `out_dir` for a model's val
    predictions `probs` of `images` (its members and vote weights give the Grad-CAM maps)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loss = losses(probs, labels)
    worst = np.argsort(-loss, kind="stable")[:GALLERY]
    pred = probs.argmax(1)
    doc = {"title": title, "val_images": int(len(labels)),
           "val_errors": int((pred != labels).sum()),
           "confused_pairs": confused_pairs(probs, labels, class_names),
           "highest_loss": [{"id": ids[i], "true": class_names[labels[i]],
                             "predicted": class_names[pred[i]],
                             "p_true": round(float(probs[i, labels[i]]), 4),
                             "loss": round(float(loss[i]), 4)} for i in worst]}
    captions = [f"true {d['true']}, pred {d['predicted']}\np(true) {d['p_true']:.2f}"
                for d in doc["highest_loss"]]
    _save(gallery_figure(images[worst], captions, f"{title}: highest-loss val images"),
          out / "errors.png")
    cams = ensemble_cam(members, weights, images[worst[:CAMS]], pred[worst[:CAMS]])
    doc["gradcam"] = cams is not None
    if cams is not None:
        shown = [overlay(img, c) for img, c in zip(images[worst[:CAMS]], cams)]
        _save(gallery_figure(np.concatenate([images[worst[:CAMS]], np.stack(shown)]),
                             captions[:CAMS] + ["Grad-CAM"] * len(shown),
                             f"{title}: Grad-CAM of the predicted class",
                             columns=len(shown)), out / "gradcam.png")
    write_json(out / "report.json", doc)
    atomic_write(out / "report.md", "\n".join(markdown(doc)) + "\n")
    return doc


def markdown(doc: dict) -> list[str]:
    lines = [f"# Model report: {doc['title']}", "",
             f"{doc['val_errors']} errors on {doc['val_images']} val images.", "",
             "## Most-confused class pairs", "", "| true | predicted | images | share of true |",
             "|---|---|---|---|"]
    lines += [f"| {p['true']} | {p['predicted']} | {p['count']} | {p['share_of_true']:.1%} |"
              for p in doc["confused_pairs"]] or ["| none | | | |"]
    lines += ["", "## Highest-loss val images (errors.png)", "", "| image | true | predicted | "
              "p(true) | loss |", "|---|---|---|---|---|"]
    lines += [f"| {h['id']} | {h['true']} | {h['predicted']} | {h['p_true']:.3f} | "
              f"{h['loss']:.3f} |" for h in doc["highest_loss"]]
    lines += ["", "gradcam.png: where the model looks for its predicted class in the first "
              f"{CAMS} of them (top: images, bottom: Grad-CAM)." if doc["gradcam"] else
              "No Grad-CAM: the model's features are not a spatial map."]
    return lines


def gallery_figure(images: np.ndarray, captions: list[str], title: str, columns: int = 8):
    plt = _pyplot()
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 2.0 + 0.4),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k], interpolation="nearest")
            ax.set_title(captions[k], fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def explain_checkpoint(checkpoint: str | Path, data, out_dir: str | Path, title: str) -> dict:
    """The model report of a trial's best checkpoint on the val images it was chosen on (its
    stored val predictions: nothing is predicted again but the Grad-CAM images)."""
    from models.artifact import load_model

    model, ckpt = load_model(checkpoint, torch.device("cpu"))
    val = ckpt.val_indices
    return model_report([(model, ckpt)], [1.0], ckpt.val_probs, data.images[val],
                        data.labels[val], data.class_names, [data.ids[i] for i in val],
                        out_dir, title)


def explain_ensemble(model, data, val: np.ndarray, out_dir: str | Path, title: str) -> dict:
    """The model report of a loaded `ensemble.EnsembleModel` on the val images `val`."""
    images = data.images[val]
    members = list(zip(model.models, model.ckpts))
    return model_report(members, list(model.weights), model.predict_proba(images), images,
                        data.labels[val], data.class_names, [data.ids[i] for i in val],
                        out_dir, title)
