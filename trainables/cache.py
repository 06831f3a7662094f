"""Data larger than memory: a decoded cache on disk that trials stream from.

The in-memory path decodes every image on the driver into one uint8 array and puts it into Ray's
object store, where every trial node holds a copy. Data whose decoded size does not fit takes
this path instead:

- Decoding is spread over the cluster's CPUs, once: Ray tasks decode chunks of files and write
  their rows straight into one `.npy` file (N, S, S, 3) uint8 under the storage folder,
  `<storage>/.decoded/<key>/images.npy`, keyed by the files (path, size, mtime) and the size.
  Every later trial, refit, resume, ensemble and search on the same files reads it; nothing is
  decoded twice. On a cluster the storage folder must be shared (EFS, NFS), as the experiment
  folder already is.
- `DiskImages` stands where the in-memory array stood: `images[idx]`, `np.take(images, idx,
  out=...)`, `shape`, `nbytes`. A read is one `pread` per run of consecutive rows into the
  caller's buffer, so a process holds the batch it asked for and nothing else (no memory map
  whose touched pages would count as the process's own). Pickled (Ray, loader workers), it is a
  path and the row numbers.

The bytes are the decoder's either way, so a seed gives the same batches, and the same run,
streamed or in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# one image file to (size, size, 3) uint8, or why it cannot be read
Decoder = Callable[[Path, int], "np.ndarray | str"]

DATA_PATHS = ("auto", "memory", "stream")
# Decoded data larger than this share of the smallest node's object store is streamed: the
# in-memory path needs it there once (and on the driver while it is put), beside the trials'
# own objects.
STREAM_SHARE = 0.5
# Ray's object store takes this share of a local node's available memory by default
# (ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION): what a local Ray not yet started will get
RAY_OBJECT_STORE_SHARE = 0.3
# Data this small (decoded) stays in memory without asking Ray (no node has a smaller store)
SMALL_BYTES = 32 * 2**20
CACHE_DIR = ".decoded"


class DiskImages:
    """(N, S, S, 3) uint8 images in a `.npy` file, read row by row on demand; `rows` maps the
    images to the file's rows (a row whose file did not decode is left out)."""

    def __init__(self, path: str | Path, rows: np.ndarray | None = None) -> None:
        self.path = str(path)
        try:
            head = np.load(self.path, mmap_mode="r")  # reads the header only
        except (FileNotFoundError, ValueError) as exc:
            from trainables.errors import UserError

            raise UserError(f"the decoded images {self.path} cannot be read ({exc}); start the "
                            "search again without --resume to decode the data anew") from None
        if head.dtype != np.uint8 or head.ndim != 4:
            raise ValueError(f"{self.path} holds {head.dtype} {head.shape}, not uint8 NHWC")
        self.offset, self.row_shape = int(head.offset), tuple(head.shape[1:])
        total = int(head.shape[0])
        del head
        self.rows = np.arange(total, dtype=np.int64) if rows is None \
            else np.asarray(rows, np.int64)
        self.row_bytes = math.prod(self.row_shape)
        self._fd: int | None = None
        self._pid = -1

    # ------------------------------------------------------------------ array-like

    dtype = np.dtype(np.uint8)
    ndim = 4

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.row_shape)

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.row_bytes

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.take(np.array([key]))[0]
        if isinstance(key, slice):
            return self.take(np.arange(len(self))[key])
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        return self.take(key)

    def take(self, indices, axis: int = 0, out: np.ndarray | None = None,
             mode: str = "raise") -> np.ndarray:
        """The images `indices` (what `np.take(images, indices, axis=0, out=out)` calls)."""
        if axis != 0 or mode != "raise":
            raise ValueError("DiskImages.take reads whole images: axis=0, mode='raise'")
        idx = np.asarray(indices, np.int64).reshape(-1)
        rows = self.rows[idx]
        if out is None:
            out = np.empty((len(rows), *self.row_shape), np.uint8)
        flat = out.reshape(len(rows), self.row_bytes)  # a view: out is C-contiguous
        if not np.shares_memory(flat, out):
            raise ValueError("out must be C-contiguous")
        fd = self._file()
        # one read per run of consecutive rows (a sequential prediction reads in long runs)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for s, e in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            want, at = (e - s) * self.row_bytes, self.offset + int(rows[s]) * self.row_bytes
            got = os.preadv(fd, [memoryview(flat[s:e]).cast("B")], at)
            if got != want:
                raise OSError(f"{self.path}: read {got} of {want} bytes at {at}; the decoded "
                              "cache is truncated: delete it and run again")
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Every image in memory (what the in-memory path holds): only for small parts."""
        out = self.take(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked loader worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __reduce__(self):
        return DiskImages, (self.path, self.rows)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"DiskImages({self.path!r}, {self.shape})"


def streamed(images) -> bool:
    """Whether `images` are read from a decoded cache on disk (not held in memory)."""
    return isinstance(images, DiskImages)


# ---------------------------------------------------------------------- the choice


@dataclass
class Decoding:
    """How a labelled dataset is decoded: into memory, or into the decoded cache under
    `storage` that trials stream from (`mode` auto decides by the decoded size against the
    smallest node's object store). `start_cluster` starts (or joins) Ray, so that decoding for
    the stream path runs over the cluster's CPUs."""

    mode: str = "auto"
    storage: Path | None = None
    start_cluster: Callable[[], object] | None = None

    def stream(self, n_images: int, image_size: int) -> bool:
        if self.mode not in DATA_PATHS:
            from trainables.errors import UserError

            raise UserError(f"--data-path must be one of {', '.join(DATA_PATHS)}, not "
                            f"{self.mode!r}")
        if self.mode != "auto" or self.storage is None:
            return self.mode == "stream" and self.storage is not None
        need = n_images * image_size * image_size * 3
        if need <= SMALL_BYTES:
            return False
        if self.start_cluster is not None:  # ask the Ray the search runs on
            self.start_cluster()
        store = object_store_bytes()
        choice = need > STREAM_SHARE * store
        log.info("data path: %s (%.2f GB decoded against %.2f GB of object store per node; "
                 "--data-path memory|stream forces one)", "stream" if choice else "memory",
                 need / 1e9, store / 1e9)
        return choice

    def decode(self, files: list[Path], image_size: int, on_bad_image: str,
               decode: Decoder) -> tuple[DiskImages, list[int]]:
        if self.start_cluster is not None:
            self.start_cluster()
        return decode_to_cache(files, image_size, on_bad_image, self.storage / CACHE_DIR,
                               decode)


def object_store_bytes() -> float:
    """The object store memory of the smallest node of the running Ray, or what a local Ray
    would get here when none runs yet."""
    import ray

    if ray.is_initialized():
        sizes = [n["Resources"].get("object_store_memory", 0) for n in ray.nodes() if n["Alive"]]
        if sizes:
            return float(min(sizes))
    return RAY_OBJECT_STORE_SHARE * available_memory()


def available_memory() -> float:
    """Bytes of memory available to new processes here (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


# ---------------------------------------------------------------------- decoding


def cache_key(files: list[Path], image_size: int) -> str:
    """Names the decoded cache of these files at this size: their paths, sizes and mtimes."""
    h = hashlib.sha256(f"{image_size}\n".encode())
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}\tmissing\n".encode())
    return h.hexdigest()[:20]


def decode_to_cache(files: list[Path], image_size: int, on_bad_image: str, root: Path,
                    decode: Decoder) -> tuple[DiskImages, list[int]]:
    """Decodes `files` once with `decode` (`trainables.data.decode_image`) into
    `root/<key>/images.npy` over the cluster's CPUs (this process's threads when Ray is not
    running), or reuses a finished cache of the same files.
    Returns the images and the positions of the files that decoded, as `decode_images` does."""
    from trainables.errors import UserError

    if on_bad_image not in ("skip", "error"):
        raise UserError(f"--on-bad-image must be 'skip' or 'error', not {on_bad_image!r}")
    final = root / cache_key(files, image_size)
    if (final / "done.json").is_file():
        log.info("the %d images at %d px were decoded before: reading %s", len(files),
                 image_size, final / "images.npy")
    else:
        _decode_into(files, image_size, root, final, decode)
    failed = {int(k): v for k, v in json.loads((final / "done.json").read_text())["failed"]}
    for i in sorted(failed):
        if on_bad_image == "error":
            raise UserError(f"cannot read image {files[i]}: {failed[i]}; fix or remove it, or "
                            "pass --on-bad-image skip")
        log.warning("skipping unreadable image %s: %s", files[i], failed[i])
    kept = [i for i in range(len(files)) if i not in failed]
    return DiskImages(final / "images.npy", np.asarray(kept, np.int64)), kept


def _decode_into(files: list[Path], image_size: int, root: Path, final: Path,
                 decode: Decoder) -> None:
    """Decodes into a folder of its own, then renames it into place (a cache is never seen
    half-written; of two searches decoding the same files at once, the first rename wins)."""
    part = root / f"{final.name}.part-{os.getpid()}"
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    head = np.lib.format.open_memmap(part / "images.npy", mode="w+", dtype=np.uint8,
                                     shape=(len(files), image_size, image_size, 3))
    offset = int(head.offset)
    del head  # a sparse file of the right size; the decoders write its rows
    start = time.time()
    failed, cpus = decode_rows_everywhere(str(part / "images.npy"), offset, files, image_size,
                                          decode)
    took = time.time() - start
    log.info("decoded %d images at %d px into %s in %.1f s (%.0f images/s on %d CPUs)",
             len(files), image_size, final, took, len(files) / max(took, 1e-9), cpus)
    (part / "done.json").write_text(json.dumps({
        "images": len(files), "image_size": image_size, "seconds": round(took, 2),
        "cpus": cpus, "failed": sorted(failed.items())}))
    try:
        os.rename(part, final)
    except OSError:  # another search finished the same cache first: use that one
        shutil.rmtree(part, ignore_errors=True)


def decode_rows_everywhere(path: str, offset: int, files: list[Path], image_size: int,
                           decode: Decoder) -> tuple[dict[int, str], int]:
    """Decodes `files` into rows 0.. of the `.npy` at `path` in chunks: Ray tasks of one CPU
    each over the cluster when Ray runs, else threads here. Returns {row: why} of the files that
    did not decode, and the CPUs used."""
    import ray

    names = [str(f) for f in files]
    if ray.is_initialized():
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    else:
        cpus = os.cpu_count() or 1
    # several chunks per CPU, so the last ones do not wait for one slow chunk
    size = max(16, min(2048, math.ceil(len(names) / (4 * cpus))))
    chunks = [(s, names[s:s + size]) for s in range(0, len(names), size)]
    failed: dict[int, str] = {}
    if ray.is_initialized():
        task = ray.remote(num_cpus=1)(decode_rows)
        pending = [task.remote(path, offset, s, part, image_size, decode)
                   for s, part in chunks]
        for part in ray.get(pending):
            failed.update(part)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(cpus) as pool:
            for part in pool.map(
                    lambda c: decode_rows(path, offset, c[0], c[1], image_size, decode), chunks):
                failed.update(part)
    return failed, cpus


def decode_rows(path: str, offset: int, start: int, files: list[str], image_size: int,
                decode: Decoder) -> dict[int, str]:
    """Decodes `files` into rows start.. of the `.npy` at `path`; {row: why} of those that
    did not decode (their rows stay zero)."""
    failed = {}
    row_bytes = image_size * image_size * 3
    fd = os.open(path, os.O_WRONLY)
    try:
        for j, f in enumerate(files):
            img = decode(Path(f), image_size)
            if isinstance(img, str):
                failed[start + j] = img
                continue
            os.pwrite(fd, np.ascontiguousarray(img).data, offset + (start + j) * row_bytes)
    finally:
        os.close(fd)
    return failed
