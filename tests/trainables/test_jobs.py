"""The training service: the resource rule, and jobs trained on a real local Ray."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from trainables.config import TrainConfig
from trainables.data import load_data
from trainables.jobs import Resources, TrainJob, train, whole_node
from trainables.models import initial_state, normalization
from trainables.split import draw_split
from trainables.start import Start
from trainables.store import epochs_path, finished, resume_path

CFG = TrainConfig(epochs=3, batch_size=8, amp="off", keep_last=0)


def test_a_job_takes_a_whole_node():
    assert whole_node([{"CPU": 2.0}]) == Resources(cpus=2.0)
    # the largest node: most GPUs first, then CPUs (a CPU head beside GPU workers)
    assert whole_node([{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}]) == Resources(8.0, 1.0)
    assert whole_node([{"CPU": 4.0}, {"CPU": 16.0}]).threads == 16
    # several GPUs on one node: DDP, one worker per GPU, the CPUs shared out
    assert whole_node([{"CPU": 16.0, "GPU": 4.0}]) == Resources(cpus=4, gpus=1.0, workers=4)
    assert whole_node([]) == Resources(cpus=1.0)
    # queued jobs split a CPU node, as many side by side as it has CPUs; a GPU node is not split
    assert whole_node([{"CPU": 8.0}], jobs=2) == Resources(cpus=4.0)
    assert whole_node([{"CPU": 2.0}], jobs=5) == Resources(cpus=1.0)
    assert whole_node([{"CPU": 8.0, "GPU": 1.0}], jobs=3) == Resources(8.0, 1.0)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_job_after_warm_worker_runs_in_the_warmed_process(local_ray):
    import ray

    from trainables import jobs

    def where() -> tuple[int, bool]:  # defined here: sent to the worker by value
        import os
        import sys

        return os.getpid(), "trainables.train" in sys.modules and "timm.optim" in sys.modules

    jobs.warm_worker()
    (ref,) = jobs._warming
    jobs._wait_for_warm_up()  # what `train` does before it submits
    assert not jobs._warming and ray.wait([ref], timeout=0)[0]  # it ended, and is spent
    warm_pid = ray.get(ref)
    # a job-shaped task (the whole 2-CPU node) lands in that process, its imports done
    probe = ray.remote(where).options(num_cpus=2)
    assert ray.get(probe.remote()) == (warm_pid, True)
    jobs._wait_for_warm_up()  # nothing left to wait for: returns at once


@pytest.fixture
def start_and_data(make_folder):
    data = load_data(make_folder(classes=3, per_class=8), image_size=32)
    split = draw_split(data.labels, val_fraction=0.25, test_fraction=0.15, seed=0,
                       class_names=data.class_names)
    mean, std = normalization(__import__("timm").create_model("resnet10t", num_classes=3))
    start = Start(initial_state("resnet10t", 3, seed=0), mean, std, "random", model="resnet10t")
    return start, data, split


@pytest.mark.slow
def test_queued_jobs_share_the_node_and_finished_ones_are_kept(local_ray, start_and_data,
                                                                  tmp_path):
    start, data, split = start_and_data
    jobs = [TrainJob(dataclasses.replace(CFG, seed=s), start.inputs(data, split.train,
                                                                    split.val),
                     tmp_path / f"job{s}" / "best.pt") for s in (0, 1)]
    results = train(jobs)
    for job, result in zip(jobs, results):
        assert result.trained and result.resources.threads == 1  # two jobs split the 2 CPUs
        assert [r["epoch"] for r in result.reports] == [1, 2, 3]
        assert result.best["epoch"] in (1, 2, 3) and 0 <= result.best["val_acc"] <= 1
        assert json.loads(epochs_path(job.checkpoint).read_text()) == result.reports
        assert finished(job.checkpoint, job.config)
    before = [j.checkpoint.stat().st_mtime_ns for j in jobs]
    again = train(jobs)  # nothing left to do: read back, not trained
    assert not any(r.trained for r in again)
    assert [r.reports for r in again] == [r.reports for r in results]
    assert [j.checkpoint.stat().st_mtime_ns for j in jobs] == before


@pytest.mark.slow
def test_an_interrupted_job_continues_after_its_last_epoch(local_ray, start_and_data,
                                                           tmp_path):
    from trainables.train import fit

    start, data, split = start_and_data
    path = tmp_path / "run" / "best.pt"

    class Lost(Exception):
        pass

    def crash_after_two(metrics: dict) -> None:
        if metrics["epoch"] == 2:
            raise Lost

    with pytest.raises(Lost):
        fit(CFG, start.inputs(data, split.train, split.val), str(path), report=crash_after_two)
    assert resume_path(path).is_file() and not finished(path, CFG)
    (result,) = train([TrainJob(CFG, start.inputs(data, split.train, split.val), path)])
    assert [r["epoch"] for r in result.reports] == [3] and finished(path, CFG)
    assert np.isfinite(result.reports[0]["train_loss"])
