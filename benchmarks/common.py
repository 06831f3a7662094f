"""What every benchmark prints with its results: machine, date, commit, repeats."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIGNS = REPO.parent / "shared" / "data" / "sign-language-digits" / "images"


def header(name: str, repeats: int, extra: str = "") -> str:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        commit = "unknown"
    import torch

    return (f"# {name}\n{time.strftime('%Y-%m-%d %H:%M')} | commit {commit} | "
            f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPUs | "
            f"torch {torch.__version__} | cuda {torch.cuda.is_available()} | repeats {repeats}"
            + (f" | {extra}" if extra else ""))


def mean_std(values: list[float]) -> str:
    a = np.asarray(values, float)
    return f"{a.mean():.4f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.4f}"


def require_signs() -> Path:
    if not SIGNS.is_dir():
        raise SystemExit(f"needs the sign-language photos at {SIGNS} (the project's shared data)")
    return SIGNS


def add_search_args(p: argparse.ArgumentParser) -> None:
    """Options of the benchmarks that run whole searches per seed on a folder of photos."""
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--data", default=None, help="class folders (default: the sign photos)")
    add_keep_arg(p)


def add_keep_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="run the searches in DIR and keep it (experiments, MLflow store, logs); "
                        "default: a temporary folder, deleted at the end")


@contextlib.contextmanager
def work_dir(args: argparse.Namespace) -> Iterator[str]:
    """The folder the searches run in: --keep DIR (made if needed, kept), else a temporary one."""
    if getattr(args, "keep", None) is None:
        with tempfile.TemporaryDirectory() as tmp:
            yield tmp
        return
    args.keep.mkdir(parents=True, exist_ok=True)
    yield str(args.keep.resolve())


def resolve_data(args: argparse.Namespace) -> str:
    """Sets args.data (default: the sign photos); returns its name for the header."""
    args.data = Path(args.data).resolve() if args.data else require_signs()
    return "sign-language digits" if args.data == SIGNS else args.data.name


def autocast() -> str:
    """The autocast dtype training uses here ('auto'), for the header."""
    import torch

    from trainables.train import amp_dtype

    return str(amp_dtype("auto", torch.device("cpu")) or "off").replace("torch.", "")


def parse_epoch_args(doc: str, argv: list[str] | None, *, epochs: int,
                     parents: tuple[argparse.ArgumentParser, ...] = ()
                     ) -> tuple[argparse.Namespace, int | None]:
    """Options shared by the epoch-timing benchmarks (plus a benchmark's own, in `parents`);
    --quick shrinks everything for a smoke test. Returns the options and, with --quick, how
    many photos per class to use."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0], parents=list(parents))
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default=None, help="class folders (default: the sign photos)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    args = p.parse_args(argv)
    per_class = None
    if args.quick:
        args.epochs, args.repeats, args.image_size, args.batch_size, per_class = 2, 1, 32, 32, 20
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (epoch 1 is warm-up)")
    return args, per_class
