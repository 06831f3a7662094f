"""Data sources: decode a dataset once into uint8 arrays at the training size.

Every source returns an `ImageData`: images (N, H, W, 3) uint8, integer labels, class names and an
id per image. The arrays are put into Ray's object store once and read zero-copy by every trial,
so no JPEG is decoded per trial or per epoch. Data larger than memory is decoded once over the
cluster into a decoded cache on disk instead, and `images` is then a `trainables.cache.DiskImages`
that reads the rows asked for (same fields, same bytes; see that module).
"""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from trainables.cache import Decoding, streamed
from trainables.errors import UserError

log = logging.getLogger(__name__)

# Pillow refuses images over ~179 megapixels as decompression bombs; phone photos reach 200 MP,
# and JPEGs are decoded at a reduced scale anyway (Image.draft). Above this, an image is skipped.
Image.MAX_IMAGE_PIXELS = 1_000_000_000
# other formats decode at full size (3 bytes a pixel, per decoding thread): a 194 kB PNG can
# hold 1.6 gigapixels, 10 GB decoded. Larger than this, such an image is refused.
FULL_DECODE_PIXELS = 250_000_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
SPLIT_NAMES = ("train", "val", "test")
# folder names users give their splits (compared case-insensitively)
SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation", "dev"),
                 "test": ("test", "testing")}


@dataclass
class ImageData:
    """A decoded, labelled image set.

    Attributes:
        images: (N, H, W, 3) uint8 array at the training resolution (a `DiskImages` reading
            from the decoded cache when the data is streamed).
        labels: (N,) int64 class indices into `class_names`.
        class_names: Sorted class names.
        ids: One id per image (path relative to the data root, or an index for built-in data).
        splits: Index arrays of a split the data came with (`train`, optionally `val`, `test`).
        source: Where the data came from, for the record.
        groups: Optional group id per image: images of one group stay in one split (copies of a
            file, a CSV's --group-col). Not cached: the split that uses it is saved.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    ids: list[str]
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""
    groups: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def facts(self) -> dict:
        """Summary numbers worth recording with an experiment."""
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {
            "source": self.source,
            "num_images": int(len(self.labels)),
            "num_classes": self.num_classes,
            "image_size": int(self.images.shape[1]),
            "min_class_count": int(counts.min()),
            "max_class_count": int(counts.max()),
            "predefined_split": ",".join(sorted(self.splits)) or "none",
            "data_path": "stream" if streamed(self.images) else "memory",
        }


def load_data(
    path: str | Path | None,
    *,
    image_size: int,
    image_col: str = "image_path",
    label_col: str = "target",
    on_bad_image: str = "skip",
    group_col: str | None = None,
    decoding: Decoding | None = None,
) -> ImageData:
    """Reads the built-in digits (path None), a folder of class folders, or a CSV.

    A folder holding `train/` (and optionally `val/`, `test/`) class folders keeps that split.
    `decoding` decides whether the images are decoded into memory (the default) or into a
    decoded cache on disk that trials stream from (`trainables.cache`).
    """
    if path is None:
        return load_digits(image_size)
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data path {path} does not exist; pass --data with a folder of class "
                        "folders or a CSV file")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise UserError(f"data path {path} is a file but not a .csv; pass a CSV with "
                            "image-path and label columns or a folder of class folders")
        return read_csv(path, image_size=image_size, image_col=image_col, label_col=label_col,
                        on_bad_image=on_bad_image, group_col=group_col, decoding=decoding)
    return read_image_folder(path, image_size=image_size, on_bad_image=on_bad_image,
                             decoding=decoding)


def load_digits(image_size: int) -> ImageData:
    """scikit-learn's 1,797 handwritten digits (8x8 grey), upscaled to RGB `image_size`."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    grey = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = np.stack([
        np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.Resampling.BILINEAR))
        for g in grey
    ])
    images = np.repeat(images[..., None], 3, axis=3)
    return ImageData(
        images=np.ascontiguousarray(images),
        labels=bunch.target.astype(np.int64),
        class_names=[str(c) for c in bunch.target_names],
        ids=[str(i) for i in range(len(grey))],
        source="sklearn-digits",
    )


def read_image_folder(root: Path, *, image_size: int, on_bad_image: str = "skip",
                      decoding: Decoding | None = None) -> ImageData:
    """Reads `root/<class>/*`, or split folders `root/{train,val,test}/<class>/*`.

    Split folders go by the names users give them, in any case: train/ or training/; val/,
    valid/, validation/ or dev/; test/ or testing/. Any other folder beside them is named in a
    warning (its images are not used), never dropped silently.
    """
    parts = split_folders(root)
    if not parts:
        files = class_files(root)
        return _decode_labelled(files, root, image_size, on_bad_image, str(root),
                                decoding=decoding)
    if "train" not in parts:
        raise UserError(f"{root} has {', '.join(p.name + '/' for p in parts.values())} but no "
                        "train/ folder; add train/<class>/ folders or pass a folder of class "
                        "folders")
    used = set(parts.values())
    for other in sorted(d for d in root.iterdir() if d.is_dir() and d not in used
                        and not d.name.startswith(".")):
        log.warning("ignoring folder %s: not a split folder (train/; val/, valid/, validation/ or "
                    "dev/; test/ or testing/); move its images into one to use them", other)
    per_part = {p: class_files(d) for p, d in parts.items()}
    class_names = sorted_classes({c for c, _ in per_part["train"]})
    for p, d in parts.items():
        unknown = sorted({c for c, _ in per_part[p]} - set(class_names))
        if unknown:
            raise UserError(f"{d} has classes {unknown} that {parts['train'].name}/ does not "
                            "have; every val/test class needs training images")
    files, owner = [], []
    for p in per_part:
        files += per_part[p]
        owner += [p] * len(per_part[p])
    return _decode_labelled(files, root, image_size, on_bad_image, str(root), class_names,
                            extra=np.array(owner), decoding=decoding)


def split_folders(root: Path) -> dict[str, Path]:
    """The split folders under `root` by part ('train', 'val', 'test'); empty for a folder of
    class folders. A folder counts only if it holds class folders, so a class called "train" or
    "test" whose images lie directly in it stays a class."""
    found: dict[str, Path] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        part = next((k for k, names in SPLIT_FOLDERS.items() if d.name.lower() in names), None)
        if part is None or not any(c.is_dir() for c in d.iterdir()):
            continue
        if part in found:
            raise UserError(f"{root} has two {part} folders, {found[part].name}/ and {d.name}/; "
                            "keep one")
        found[part] = d
    return {k: found[k] for k in SPLIT_NAMES if k in found}


def labelled_rows(path: Path, image_col: str, label_col: str):
    """The CSV's rows that have both an image path and a label (a DataFrame); UserErrors for a
    file that is not a CSV or lacks either column."""
    import pandas as pd

    try:  # as text: labels 0, 1 stay "0", "1" (not 0.0, 1.0 once a cell is empty)
        table = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read CSV {path}: {exc}; check that it is a comma-separated "
                        "file with a header row") from None
    missing = [c for c in (image_col, label_col) if c not in table.columns]
    if missing:
        raise UserError(f"CSV {path} has no column {', '.join(map(repr, missing))} (it has "
                        f"{', '.join(map(repr, table.columns))}); pass --image-col and --label-col")
    for col in (image_col, label_col):
        table[col] = table[col].str.strip().replace("", None)
    empty = {c: int(table[c].isna().sum()) for c in (image_col, label_col)}
    if any(empty.values()):
        first = int(table[[image_col, label_col]].isna().any(axis=1).to_numpy().argmax()) + 2
        log.warning("CSV %s: ignoring %s (the first on line %d); fill them in to use those "
                    "rows", path, " and ".join(f"{n} row(s) with an empty {c!r} cell"
                                               for c, n in empty.items() if n), first)
    return table.dropna(subset=[image_col, label_col])


def read_csv(path: Path, *, image_size: int, image_col: str, label_col: str,
             on_bad_image: str = "skip", group_col: str | None = None,
             decoding: Decoding | None = None) -> ImageData:
    """Reads a CSV with an image-path column and a label column (paths relative to the CSV)."""
    table = labelled_rows(path, image_col, label_col)
    if table.empty:
        raise UserError(f"CSV {path} has no rows with both {image_col!r} and {label_col!r}; "
                        "add labelled rows")
    if group_col is not None and group_col not in table.columns:
        raise UserError(f"CSV {path} has no group column {group_col!r} (it has "
                        f"{', '.join(map(repr, table.columns))}); pass an existing --group-col")
    table = _without_duplicate_rows(table, path, image_col, label_col)
    labels = table[label_col].astype(str).str.strip().tolist()
    files = [(lab, path.parent / str(p)) for lab, p in zip(labels, table[image_col])]
    groups = table[group_col].astype(str).tolist() if group_col else None
    return _decode_labelled(files, path.parent, image_size, on_bad_image, str(path),
                            groups=groups, decoding=decoding)


def _without_duplicate_rows(table, path: Path, image_col: str, label_col: str):
    """Drops repeated (image, label) rows; an image listed under two labels stays, with a
    warning (both copies will sit in one split)."""
    dup = table.duplicated(subset=[image_col, label_col])
    if dup.any():
        log.warning("CSV %s lists %d row(s) twice (same image and label); using each once",
                    path, int(dup.sum()))
        table = table[~dup]
    labels_per_image = table.groupby(image_col)[label_col].nunique()
    conflicting = labels_per_image[labels_per_image > 1]
    if len(conflicting):
        log.warning("CSV %s gives %d image(s) more than one label (e.g. %s); each copy is kept "
                    "and all copies of an image stay in one split", path, len(conflicting),
                    conflicting.index[0])
    return table


def read_unlabelled(path: str | Path, *, image_size: int, image_col: str = "image_path",
                    on_bad_image: str = "skip") -> tuple[np.ndarray, list[str]]:
    """Reads images to predict: a folder (searched recursively) or a CSV with an image column."""
    import pandas as pd

    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"predict path {path} does not exist; pass a folder of images or a CSV")
    if path.is_file():
        table = pd.read_csv(path)
        if image_col not in table.columns:
            raise UserError(f"CSV {path} has no column {image_col!r} (it has "
                            f"{', '.join(map(repr, table.columns))}); pass --image-col")
        files = [path.parent / str(p) for p in table[image_col].dropna()]
        root = path.parent
    else:
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        root = path
    if not files:
        raise UserError(f"no images found in {path}; expected image files "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    images, kept = decode_images(files, image_size, on_bad_image)
    ids = [relative_id(files[i], root) for i in kept]
    if not ids:
        raise UserError(f"none of the images in {path} could be read; check the files")
    return images, ids


def decode_images(files: list[Path], image_size: int,
                  on_bad_image: str = "skip") -> tuple[np.ndarray, list[int]]:
    """Decodes files in parallel to (N, S, S, 3) uint8; returns the array and kept positions."""
    if on_bad_image not in ("skip", "error"):
        raise UserError(f"--on-bad-image must be 'skip' or 'error', not {on_bad_image!r}")
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        decoded = list(pool.map(lambda f: decode_image(f, image_size), files))
    kept = []
    for i, (f, img) in enumerate(zip(files, decoded)):
        if isinstance(img, str):
            if on_bad_image == "error":
                raise UserError(f"cannot read image {f}: {img}; fix or remove it, or pass "
                                "--on-bad-image skip")
            log.warning("skipping unreadable image %s: %s", f, img)
        else:
            kept.append(i)
    out = np.empty((len(kept), image_size, image_size, 3), np.uint8)
    for j, i in enumerate(kept):
        out[j] = decoded[i]
    return out, kept


def decode_image(path: Path, size: int) -> np.ndarray | str:
    """One image to (size, size, 3) uint8 (shorter side resized, centre cropped), or an error."""
    try:
        with warnings.catch_warnings():  # we name the size ourselves, in one sentence
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            limit = Image.MAX_IMAGE_PIXELS if im.format == "JPEG" else FULL_DECODE_PIXELS
            if im.size[0] * im.size[1] > limit:
                return (f"{im.size[0]}x{im.size[1]} pixels, more than the {limit:,} a "
                        f"{im.format} may have here (it would take "
                        f"{im.size[0] * im.size[1] * 3 / 1e9:.1f} GB to decode); downscale it")
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, far faster for photos
            im = _to_rgb(ImageOps.exif_transpose(im))
            w, h = im.size
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            im = im.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        return "file not found"
    except Image.DecompressionBombError:
        return f"larger than {Image.MAX_IMAGE_PIXELS:,} pixels"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"not a readable image ({type(exc).__name__}: {exc})"


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with 16-bit and float images scaled into 0-255 rather than clipped (Pillow's own
    conversion clips a 16-bit grey PNG to almost all white)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0  # 0..65535 -> 0..255
        elif a.size and a.max() > 255:  # 32-bit int / float: stretch its own range
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
        im = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), mode="L")
    return im.convert("RGB")


def class_files(root: Path) -> list[tuple[str, Path]]:
    """(class, file) pairs for root/<class>/<image>; folders without images are not classes.

    A linked folder that leads back to the data (the root, an ancestor, another class) is not a
    class: it would add every image a second time under another label.
    """
    pairs, seen = [], set()
    real_root = root.resolve()
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(".")):
        hidden = sum(1 for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if hidden and d.name not in (".", ".."):
            log.warning("ignoring folder %s with %d image(s): a name starting with '.' marks a "
                        "hidden folder, not a class; rename it to use its images", d, hidden)
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        real = d.resolve()
        if real in seen or real == real_root or real in real_root.parents \
                or (d.is_symlink() and real_root in real.parents):
            log.warning("ignoring folder %s: it links to %s, which the data already holds", d,
                        real)
            continue
        seen.add(real)
        pairs += [(d.name, f) for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not pairs:
        raise UserError(f"no images found under {root}; expected class folders like "
                        f"{root}/<class>/<image>.jpg, a train/ folder, or a CSV file")
    return pairs


def _decode_labelled(files: list[tuple[str, Path]], root: Path, image_size: int,
                     on_bad_image: str, source: str, class_names: list[str] | None = None,
                     extra: np.ndarray | None = None, groups: list[str] | None = None,
                     decoding: Decoding | None = None) -> ImageData:
    class_names = class_names or sorted_classes({c for c, _ in files})
    index = {c: i for i, c in enumerate(class_names)}
    paths = [f for _, f in files]
    if decoding is not None and decoding.stream(len(paths), image_size):
        images, kept = decoding.decode(paths, image_size, on_bad_image, decode_image)
    else:
        images, kept = decode_images(paths, image_size, on_bad_image)
    if not kept:
        raise UserError(f"none of the {len(files)} images under {source} could be read; "
                        "check the files")
    labels = np.array([index[files[i][0]] for i in kept], np.int64)
    if len(np.unique(labels)) < 2:
        raise UserError(f"{source} holds readable images of one class only "
                        f"({class_names[int(labels[0])]!r}); a classifier needs images of at "
                        "least two classes")
    splits = {}
    if extra is not None:
        owner = extra[kept]
        splits = {p: np.flatnonzero(owner == p) for p in SPLIT_NAMES if (owner == p).any()}
    return ImageData(images=images, labels=labels, class_names=class_names,
                     ids=[relative_id(files[i][1], root) for i in kept], splits=splits,
                     source=source, groups=_groups([files[i][1] for i in kept],
                                    [groups[i] for i in kept] if groups else None))


def _groups(files: list[Path], named: list[str] | None) -> np.ndarray | None:
    """A group id per image, or None when every image is its own group. Copies of one file
    (under two labels, or linked) form a group, and so do images of one named group (a CSV's
    --group-col); a file in two named groups joins them (connected components)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    _, by_file = np.unique([str(f.resolve()) for f in files], return_inverse=True)
    if named is None:
        out = by_file
    else:
        _, by_name = np.unique(named, return_inverse=True)
        n_files = int(by_file.max()) + 1
        nodes = n_files + int(by_name.max()) + 1  # file nodes, then group-name nodes
        edges = coo_matrix((np.ones(len(files)), (by_file, n_files + by_name)),
                           shape=(nodes, nodes))
        out = connected_components(edges, directed=False)[1][by_file]
    return None if len(np.unique(out)) == len(out) else out.astype(np.int64)


def sorted_classes(names: set[str]) -> list[str]:
    """Numeric labels sort as numbers ('2' before '10'); anything else sorts as text."""
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def relative_id(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def save_image_data(data: ImageData, path: str | Path) -> None:
    """Caches decoded data (uncompressed .npz) so resume and ensembles skip decoding; streamed
    data keeps its images in its decoded cache, and the .npz names them."""
    from trainables.cache import streamed
    from trainables.files import atomic_write

    images = {"images": data.images}
    if streamed(data.images):
        images = {"images_file": np.array(data.images.path), "images_rows": data.images.rows}
    atomic_write(path, lambda f: np.savez(
        f, **images, labels=data.labels,
        class_names=np.array(data.class_names, dtype=str), ids=np.array(data.ids, dtype=str),
        source=np.array(data.source), **{f"split_{k}": v for k, v in data.splits.items()}))


def load_image_data(path: str | Path) -> ImageData:
    with np.load(path, allow_pickle=False) as z:
        if "images_file" in z.files:
            from trainables.cache import DiskImages

            images = DiskImages(str(z["images_file"]), z["images_rows"])
        else:
            images = z["images"]
        return ImageData(images=images, labels=z["labels"],
                         class_names=z["class_names"].tolist(), ids=z["ids"].tolist(),
                         splits={k[6:]: z[k] for k in z.files if k.startswith("split_")},
                         source=str(z["source"]))
