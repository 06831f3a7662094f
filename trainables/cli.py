"""What both entry points (`search.run`, `ensemble.build`) share: typed options from dataclass
fields, YAML reading, logging set-up, the UserError exit and the Ray connection."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import re
import sys
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from trainables.errors import UserError

NOISY_LOGGERS = ("alembic", "mlflow", "urllib3", "filelock", "optuna", "matplotlib")
# what the file system says when the storage cannot take our files: one sentence, not a traceback
STORAGE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                  errno.EFBIG, errno.ENOTDIR, errno.EEXIST}


def default_storage() -> str:
    """Where experiment folders go: IMGSEARCH_STORAGE (the cluster image sets a shared file
    system there), else ./runs."""
    return os.environ.get("IMGSEARCH_STORAGE", "runs")


def parse_duration(text: str | float | int) -> float:
    """Seconds from '20m', '1h30m', '90s', '1.5h' or a plain number of seconds (--time-budget)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)([hms]?)", s)
        if not s or "".join(n + u for n, u in parts) != s:
            raise UserError(f"--time-budget {text!r} is not a duration; write e.g. 20m, 1h30m, "
                            "90s or a number of seconds")
        unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}
        seconds = sum(float(n) * unit[u] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"--time-budget must be positive, not {text!r}")
    return seconds


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as text; read it as the number everybody means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$"
               r"|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def process_start() -> float:
    """When this process started (UNIX time, to the second: Linux's /proc), else now: a
    --time-budget counts the command's start-up (imports: ~5 s) too."""
    from pathlib import Path

    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()
    return started if time.time() - 600 < started <= time.time() else time.time()


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field that is also a command-line option with this help text."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: default, metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class CommonOptions:
    """The options every entry point shares (search.run, ensemble.build, ensemble.distill):
    which experiment, where it lives, where MLflow and Ray are."""

    experiment: str = opt("default", "Experiment name: its folder under --storage and its MLflow "
                          "experiment (for ensemble.build and ensemble.distill: the search to "
                          "work on).")
    storage: str = opt(default_storage(), "Folder holding experiment folders (results, split, "
                       "checkpoints); on a multi-node cluster a shared file system (default: "
                       "IMGSEARCH_STORAGE, else ./runs).")
    tracking_uri: str | None = opt(None, "MLflow tracking URI (default: the search's; for a new "
                                   "search MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here).")
    address: str | None = opt(None, "Ray cluster to join (default: RAY_ADDRESS, else start a "
                              "local Ray).")
    num_cpus: int | None = opt(None, "CPUs of the local Ray started when no cluster is given "
                               "(default: all).")
    image_col: str = opt("image_path", "CSV column holding image paths, relative to the CSV "
                         "(of --data, --predict or --pseudo-label).")
    register: str | None = opt(None, "Log the final model (search.run: the refit, else the best "
                               "trial; ensemble.build: the chosen ensemble; ensemble.distill: "
                               "the student) as an MLflow model (a pyfunc taking image file "
                               "bytes) and register a new version under this name, ready for "
                               "mlflow models serve.")

    def check_common(self) -> None:
        """The one check of the shared options: a plain experiment name, a valid model name."""
        from trainables.store import check_experiment_name

        check_experiment_name(self.experiment)
        if self.register is not None:
            from trainables.tracking import check_model_name

            check_model_name(self.register)


def add_options(parser: argparse.ArgumentParser, cls: type, *,
                only: typing.Iterable[str] | None = None) -> None:
    """One flag per dataclass field (or per field named in `only`), with the field's help; every
    default is None (= unset), so a flag overrides a config file only when given."""
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        if f.metadata.get("cli") is None and "help" not in f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.metadata.get("cli") is False:  # repeated NAME=SPEC entries
            parser.add_argument(flag, action="append", metavar="NAME=SPEC", help=help_text)
            continue
        if f.metadata.get("cli_list"):
            parser.add_argument(flag, action="append", metavar=f.metadata.get("metavar", "MODULE"),
                                help=help_text)
            continue
        kind = base_type(f.type)
        if f.default is not None and "default" not in help_text.lower():
            help_text += f" (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        choices = f.metadata.get("choices")
        parser.add_argument(flag, type=kind, default=None, choices=choices,
                            metavar=None if choices else f.name.upper(), help=help_text)


def typed(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Checks each option's value against its declared type (ints may stand for floats)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name, value in values.items():
        f = fields[name]
        kind = base_type(f.type)
        optional = "None" in str(f.type)
        if value is None and optional:
            out[name] = value
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
        elif kind is tuple and isinstance(value, (list, tuple)):
            out[name] = tuple(value)
        elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            out[name] = value
        else:
            raise UserError(f"option {name} must be {_KIND_NAMES.get(kind, kind.__name__)}, "
                            f"not {value!r}; fix it in the config file or flags")
    return out


_KIND_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def base_type(tp: Any) -> type:
    """The type of a field annotation, without `| None`."""
    if isinstance(tp, str):
        tp = eval(tp, {"dict": dict, "list": list})  # annotations are strings (PEP 563)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def run_main(body: Callable[[], int]) -> int:
    """Runs an entry point: logging set up once, user mistakes end in one sentence and exit code
    2, never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # our own progress lines report trials; Tune's tables would repeat them at length
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        return body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in STORAGE_ERRORS:
            raise
        what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EFBIG: "the file grew too large"}.get(exc.errno, exc.strerror)
        print(f"error: cannot write {exc.filename or 'the experiment folder'}: {what}; free "
              "space, or pass a writable --storage / --output, then run again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; what finished is saved (a search continues with --resume)",
              file=sys.stderr)
        return 130


def exit_now(code: int) -> typing.NoReturn:
    """Ends a command's process once its work is done, without tearing the interpreter down.

    Everything a normal exit runs first still runs: other threads that are not daemons are
    waited for, then the atexit handlers (logging's flush, MLflow's end of runs, Ray's
    shutdown, weakref finalizers), then stdout and stderr are flushed. What is skipped is the
    module teardown after them, which takes 1-2.5 s once torch, timm, MLflow and Ray are
    loaded: time a budgeted run otherwise keeps free at its end. Only for `__main__` blocks:
    a caller of `main()` (a test) keeps its interpreter."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to say
            pass
    os._exit(code if isinstance(code, int) else 1)


def start_ray(address: str | None, num_cpus: int | None) -> bool:
    """Joins the cluster at `address` / RAY_ADDRESS or starts a local Ray; True if this process
    started (and so must shut down) Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S":  # 60 s is too short on small machines
           os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300"),
           # Ray Train collects worker reports on each health-check poll (2 s by default), which
           # stretches short DDP epochs to 2 s; poll faster
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S":
           os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
           "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    local = {} if address else _loopback_only()
    try:
        # workers' own output stays in Ray's session logs: a finished trial's process prints
        # expected teardown tracebacks (SystemExit in Ray's SIGTERM handler, placement group
        # clean-up) that read like failures; real failures reach the driver through Tune
        ray.init(address=address, num_cpus=None if address else num_cpus,
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": env}, **local)
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address} ({exc}); check "
                        "--address/RAY_ADDRESS or leave both unset for a local Ray") from None
    return True


def _loopback_only() -> dict:
    """ray.init options that keep a local Ray on 127.0.0.1: by default its servers (GCS, raylet,
    object manager, agents, metrics) listen on every interface, and a laptop's search has no
    reason to be reachable from its network, token authentication or not. Ray binds loopback
    only where the node IP is loopback, and on Linux it replaces a given 127.0.0.1 by the LAN
    address unless cluster mode is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when ray is
    imported: set here for the processes Ray starts, and on the module for this one). A
    cluster (--address) is unchanged."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    return {"_node_ip_address": "127.0.0.1"}


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fails in one sentence, within seconds, when nothing listens at a Ray address (ray.init
    would otherwise retry for minutes, warning every few seconds)."""
    import socket

    if address in ("auto", "local"):
        return
    host_port = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address/RAY_ADDRESS {address!r} is not HOST:PORT (e.g. "
                        "10.0.0.5:6379, or ray://10.0.0.5:10001); fix it or leave both unset "
                        "for a local Ray")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
                        "check --address/RAY_ADDRESS or leave both unset for a local "
                        "Ray") from None
