"""`python -m search.run`: data -> split -> Optuna/ASHA search on Ray Tune -> MLflow -> results."""

from __future__ import annotations

import logging
import os
import sys
import time

from search.config import SearchConfig, parse_config
from search.experiment import Experiment
from trainables.errors import UserError

log = logging.getLogger("search")


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes end in one sentence and exit code 2, never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # our ProgressPrinter reports trials; Tune's own tables would repeat it at length
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        cfg = parse_config(argv)
        return run(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(cfg: SearchConfig) -> int:
    """Runs (or resumes) one search and writes its results; returns the exit code."""
    from search import session

    start = time.time()
    exp = Experiment.open(cfg)
    cfg = exp.cfg
    data, split = exp.data_and_split()  # bad data fails here, before anything is written
    init = session.shared_init(cfg, exp, data.num_classes)
    exp.create(data, split, init)
    owns_ray = start_ray(cfg)
    try:
        outcome = session.search(cfg, exp, data, split, init, start)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    return outcome


def start_ray(cfg: SearchConfig) -> bool:
    """Joins the cluster given by --address / RAY_ADDRESS or starts a local Ray; True if started."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S":  # 60 s is too short on small machines
           os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300"),
           # Ray Train collects worker reports on each health-check poll (2 s by default), which
           # stretches short DDP epochs to 2 s; poll faster
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S":
           os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
           "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    try:
        ray.init(address=address, num_cpus=None if address else cfg.num_cpus,
                 include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": env})
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address} ({exc}); check "
                        "--address/RAY_ADDRESS or leave both unset for a local Ray") from None
    return True


if __name__ == "__main__":
    sys.exit(main())
