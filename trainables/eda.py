"""The data report: what to check about a dataset before trusting any score trained on it.

Class counts and imbalance, image sizes, aspect ratios, colour modes and formats, files that do
not decode, exact duplicates by content hash (and duplicates whose copies sit in different parts
of the split: a test image that is also a training image inflates the test score), and a grid of
sample images per class. `search.run` writes it into the experiment folder before training and
logs it to the search's MLflow run; alone:

    python -m trainables.eda path/to/images          # or a CSV, or nothing: the built-in digits
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainables.data import (
    SPLIT_NAMES,
    class_files,
    decode_images,
    labelled_rows,
    relative_id,
    sorted_classes,
    split_folders,
)
from trainables.errors import UserError
from trainables.files import atomic_write, write_json

log = logging.getLogger(__name__)
GRID_CLASSES, GRID_PER_CLASS, GRID_PX = 30, 8, 64  # the sample grid: rows, columns, pixels
SHOWN = 20  # list entries (duplicates, unreadable files) spelled out in report.md


@dataclass
class ImageFacts:
    """One image file as found on disk, before any decoding for training."""

    id: str  # path relative to the data root, as the split and the predictions name it
    label: str
    part: str  # train, val or test when known, else ""
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    sha: str = ""
    error: str = ""  # why it does not decode, or "" when it does
    path: str = ""  # where it is read from (not reported)


# ---------------------------------------------------------------------------- reading


def scan(path: str | Path | None, *, image_col: str = "image_path",
         label_col: str = "target") -> tuple[list[ImageFacts], list[str]]:
    """Facts of every labelled image of a dataset (as `--data` takes it) and its class names."""
    if path is None:
        return _scan_digits()
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data path {path} does not exist; pass a folder of class folders or a "
                        "CSV file")
    if path.is_file():
        files, root = _csv_files(path, image_col, label_col), path.parent
    else:
        files, root = _folder_files(path), path
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        facts = list(pool.map(lambda f: _file_facts(f[0], f[1], root, f[2]), files))
    return facts, sorted_classes({f.label for f in facts})


def _folder_files(root: Path) -> list[tuple[str, Path, str]]:
    """(class, file, part) for class folders, or for train/val/test folders of class folders."""
    parts = split_folders(root)
    if not parts:
        return [(c, f, "") for c, f in class_files(root)]
    return [(c, f, part) for part, d in parts.items() for c, f in class_files(d)]


def _csv_files(path: Path, image_col: str, label_col: str) -> list[tuple[str, Path, str]]:
    table = labelled_rows(path, image_col, label_col)
    return [(str(lab).strip(), path.parent / str(p), "")
            for lab, p in zip(table[label_col], table[image_col])]


def _file_facts(label: str, path: Path, root: Path, part: str) -> ImageFacts:
    """Reads one file: content hash, header facts, and a cheap full decode (JPEGs at reduced
    scale) that finds truncated and corrupt files the header alone would pass."""
    from PIL import Image

    facts = ImageFacts(id=relative_id(path, root), label=label, part=part, path=str(path))
    try:
        raw = path.read_bytes()
        facts.sha = hashlib.blake2b(raw, digest_size=16).hexdigest()
        with Image.open(io.BytesIO(raw)) as im:
            facts.width, facts.height = im.size
            facts.mode, facts.format = im.mode, im.format or ""
            im.draft("RGB", (GRID_PX, GRID_PX))
            im.load()
    except Exception as exc:  # any failure to read or decode is what we report
        facts.error = f"{type(exc).__name__}: {exc}"
    return facts


def _scan_digits() -> tuple[list[ImageFacts], list[str]]:
    """The built-in digits as they come from scikit-learn: 8x8 grey arrays."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    facts = [ImageFacts(id=str(i), label=str(y), part="", width=8, height=8, mode="L",
                        format="sklearn", sha=hashlib.blake2b(img.tobytes(),
                                                             digest_size=16).hexdigest())
             for i, (img, y) in enumerate(zip(bunch.images, bunch.target))]
    return facts, [str(c) for c in bunch.target_names]


# ---------------------------------------------------------------------------- summarising


def summarise(facts: list[ImageFacts], class_names: list[str]) -> dict:
    """The report's numbers as plain JSON data."""
    ok = [f for f in facts if not f.error]
    counts = Counter(f.label for f in ok)
    per_class = {c: counts.get(c, 0) for c in class_names}
    sizes = np.array([(f.width, f.height) for f in ok], float).reshape(-1, 2)
    aspect = sizes[:, 0] / np.maximum(sizes[:, 1], 1) if len(sizes) else np.zeros(0)
    low = min(per_class.values(), default=0)
    return {
        "num_files": len(facts), "num_readable": len(ok), "num_classes": len(class_names),
        "class_counts": per_class,
        "imbalance": round(max(per_class.values(), default=0) / low, 2) if low else None,
        "width": _spread(sizes[:, 0]), "height": _spread(sizes[:, 1]),
        "aspect": _spread(aspect), "aspect_bins": _aspect_bins(aspect),
        "modes": dict(Counter(f.mode for f in ok).most_common()),
        "formats": dict(Counter(f.format for f in ok).most_common()),
        "unreadable": [{"id": f.id, "label": f.label, "error": f.error}
                       for f in facts if f.error],
        **duplicates(ok),
    }


def duplicates(facts: list[ImageFacts]) -> dict:
    """Groups of files with identical content: all of them, those whose copies carry different
    labels, and those whose copies fall in different parts of the split (leaks)."""
    groups: dict[str, list[ImageFacts]] = defaultdict(list)
    for f in facts:
        groups[f.sha].append(f)
    dup = [g for g in groups.values() if len(g) > 1]
    as_doc = [[{"id": f.id, "label": f.label, "part": f.part} for f in g] for g in dup]
    return {
        "duplicate_groups": as_doc,
        "duplicate_files": sum(len(g) - 1 for g in dup),
        "conflicting_labels": [d for d, g in zip(as_doc, dup) if len({f.label for f in g}) > 1],
        "cross_split": [d for d, g in zip(as_doc, dup)
                        if len({f.part for f in g if f.part}) > 1],
    }


def _spread(values: np.ndarray) -> dict:
    if not len(values):
        return {}
    q = np.percentile(values, [0, 5, 50, 95, 100])
    return dict(zip(("min", "p5", "median", "p95", "max"), (round(float(v), 3) for v in q)))


def _aspect_bins(aspect: np.ndarray) -> dict[str, int]:
    """Width / height in bands a person reads at a glance (square, landscape, portrait...)."""
    edges = [0, 0.5, 0.8, 0.95, 1.05, 1.25, 2.0, np.inf]
    names = ["<0.5", "0.5-0.8", "0.8-0.95", "square", "1.05-1.25", "1.25-2", ">2"]
    counts = np.histogram(aspect, bins=edges)[0] if len(aspect) else np.zeros(len(names), int)
    return {n: int(c) for n, c in zip(names, counts) if c}


def with_split(facts: list[ImageFacts], parts: dict[str, str]) -> list[ImageFacts]:
    """Assigns each image its part of a search's split (`id -> part`); others keep theirs."""
    for f in facts:
        f.part = parts.get(f.id, f.part)
    return facts


def split_parts(split_doc: dict) -> dict[str, str]:
    """`id -> part` from a split.json written with image ids."""
    ids = split_doc.get("ids") or {}
    return {i: part for part in SPLIT_NAMES for i in ids.get(part, [])}


# ---------------------------------------------------------------------------- writing


def data_report(path: str | Path | None, out_dir: str | Path, *, image_col: str = "image_path",
                label_col: str = "target", parts: dict[str, str] | None = None) -> dict:
    """Scans a dataset and writes report.json, report.md, overview.png and samples.png to
    `out_dir`; returns the report's numbers."""
    facts, class_names = scan(path, image_col=image_col, label_col=label_col)
    if parts:
        with_split(facts, parts)
    doc = {"source": str(path) if path is not None else "sklearn-digits",
           **summarise(facts, class_names)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", doc)
    atomic_write(out / "report.md", "\n".join(markdown(doc)) + "\n")
    save_figure(overview_figure(doc), out / "overview.png")
    save_figure(samples_figure(facts, class_names), out / "samples.png")
    return doc


def findings(doc: dict) -> list[str]:
    """What deserves a person's attention, most serious first; empty when nothing does."""
    out = []
    if doc["cross_split"]:
        out.append(f"{len(doc['cross_split'])} group(s) of identical images sit in different "
                   "parts of the split (train/val/test): scores on val and test are inflated")
    if doc["conflicting_labels"]:
        out.append(f"{len(doc['conflicting_labels'])} group(s) of identical images carry "
                   "different labels")
    if doc["unreadable"]:
        out.append(f"{len(doc['unreadable'])} file(s) do not decode and are skipped")
    if doc["duplicate_files"]:
        out.append(f"{doc['duplicate_files']} file(s) are exact copies of another")
    if doc["imbalance"] is None or doc["imbalance"] >= 3:
        out.append(f"classes are imbalanced (largest / smallest = {doc['imbalance'] or 'inf'}); "
                   "consider --class-weight or --sampler balanced")
    if len(doc["modes"]) > 1:
        out.append(f"mixed colour modes {dict(doc['modes'])}: all are converted to RGB")
    return out


def markdown(doc: dict) -> list[str]:
    lines = [f"# Data report: {doc['source']}", "",
             f"{doc['num_readable']} readable images of {doc['num_files']} files, "
             f"{doc['num_classes']} classes.", ""]
    lines += ["## Findings", ""] + [f"- {f}" for f in findings(doc) or ["nothing unusual"]]
    lines += ["", "## Classes", "", "| class | images |", "|---|---|"]
    lines += [f"| {c} | {n} |" for c, n in doc["class_counts"].items()]
    lines += ["", "## Images", "", f"- width: {doc['width']}", f"- height: {doc['height']}",
              f"- aspect (width / height): {doc['aspect_bins']}", f"- modes: {doc['modes']}",
              f"- formats: {doc['formats']}"]
    for title, key in (("Duplicates across split parts", "cross_split"),
                       ("Duplicates with different labels", "conflicting_labels"),
                       ("Duplicates", "duplicate_groups")):
        if doc[key]:
            lines += ["", f"## {title}", ""] + [
                "- " + ", ".join(f"{f['id']} ({f['label']}{', ' + f['part'] if f['part'] else ''})"
                                 for f in group) for group in doc[key][:SHOWN]]
    if doc["unreadable"]:
        lines += ["", "## Unreadable files", ""] + [
            f"- {u['id']}: {u['error']}" for u in doc["unreadable"][:SHOWN]]
    return lines


def overview_figure(doc: dict):
    """Class counts beside the distribution of image sizes."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(doc["class_counts"])
    ax1.bar(range(len(names)), list(doc["class_counts"].values()))
    ax1.set_xticks(range(len(names)), names, rotation=90 if len(names) > 12 else 0)
    ax1.set_title(f"images per class (largest / smallest = {doc['imbalance']})")
    bins = doc["aspect_bins"]
    ax2.bar(list(bins), list(bins.values()), color="tab:green")
    ax2.set_title(f"aspect ratio; width {_range(doc['width'])}, height {_range(doc['height'])}")
    fig.tight_layout()
    return fig


def samples_figure(facts: list[ImageFacts], class_names: list[str]):
    """Up to GRID_PER_CLASS readable images of each of the first GRID_CLASSES classes, one row
    per class (one mosaic image: a figure of hundreds of small axes takes seconds to draw)."""
    plt = pyplot()
    shown = class_names[:GRID_CLASSES]
    picks = {c: [f for f in facts if f.label == c and not f.error][:GRID_PER_CLASS] for c in shown}
    images = iter(_grid_images([f for c in shown for f in picks[c]]))
    cell = GRID_PX + 2
    mosaic = np.full((len(shown) * cell, GRID_PER_CLASS * cell, 3), 255, np.uint8)
    for r, c in enumerate(shown):
        for j in range(len(picks[c])):
            mosaic[r * cell:r * cell + GRID_PX, j * cell:j * cell + GRID_PX] = next(images)
    fig, ax = plt.subplots(figsize=(GRID_PER_CLASS * 0.8 + 1, len(shown) * 0.8 + 0.4))
    ax.imshow(mosaic)
    ax.set_yticks([r * cell + GRID_PX / 2 for r in range(len(shown))], shown)
    ax.set_xticks([])
    ax.set_title("samples per class" + (f" (first {GRID_CLASSES} of {len(class_names)} classes)"
                                        if len(class_names) > GRID_CLASSES else ""))
    fig.tight_layout()
    return fig


def _grid_images(facts: list[ImageFacts]) -> np.ndarray:
    """The picked images decoded as training decodes them (digits: upscaled as training does)."""
    if facts and facts[0].format == "sklearn":
        from PIL import Image
        from sklearn.datasets import load_digits

        grey = load_digits().images[[int(f.id) for f in facts]] * (255.0 / 16.0)
        return np.stack([np.asarray(Image.fromarray(g.round().astype(np.uint8)).resize(
            (GRID_PX, GRID_PX), Image.Resampling.BILINEAR).convert("RGB")) for g in grey])
    images, _ = decode_images([Path(f.path) for f in facts], GRID_PX)
    return images


def _range(spread: dict) -> str:
    return f"{spread.get('min', 0):g}-{spread.get('max', 0):g}" if spread else "n/a"


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    from trainables.cli import run_main

    parser = argparse.ArgumentParser(
        prog="python -m trainables.eda",
        description="Data report of a labelled image set: class balance, image sizes and modes, "
                    "unreadable files, duplicates (also across train/val/test), sample grid.")
    parser.add_argument("data", nargs="?", help="a folder of class folders, a folder with "
                        "train/ (val/, test/) class folders, or a CSV; default: the digits")
    parser.add_argument("--image-col", default="image_path", help="CSV column of image paths")
    parser.add_argument("--label-col", default="target", help="CSV column of labels")
    parser.add_argument("--split", help="a search's split.json: its parts are used to find "
                        "duplicates across train/val/test")
    parser.add_argument("--out", default="data_report", help="folder to write the report to")
    args = parser.parse_args(argv)
    return run_main(lambda: _cli(args))


def _read_split(path: str, read_json) -> dict[str, str]:
    """`id -> part` of a split.json, or one sentence on why the file is not one."""
    import json

    try:
        doc = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"split file {path} is not JSON ({exc}); pass an experiment's "
                        "split.json to --split") from None
    ids = doc.get("ids") if isinstance(doc, dict) else None
    if not isinstance(ids, dict) or not ids or not all(
            k in SPLIT_NAMES and isinstance(v, list) and all(isinstance(i, str) for i in v)
            for k, v in ids.items()):
        raise UserError(f"split file {path} has no image ids by part ('ids': {{'train': [...], "
                        "'val': [...], 'test': [...]}}); pass the split.json a search wrote")
    return split_parts(doc)


def _cli(args: argparse.Namespace) -> int:
    from trainables.files import read_json

    parts = None
    if args.split:
        if not Path(args.split).is_file():
            raise UserError(f"split file {args.split} does not exist; pass an experiment's "
                            "split.json to --split")
        parts = _read_split(args.split, read_json)
    doc = data_report(args.data, args.out, image_col=args.image_col,
                      label_col=args.label_col, parts=parts)
    print("\n".join(markdown(doc)[:8 + len(findings(doc))]))
    print(f"\nfull report: {Path(args.out).resolve() / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
