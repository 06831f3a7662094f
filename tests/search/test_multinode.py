"""A real multi-node Ray cluster on this machine (several raylets via ray.cluster_utils)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, read_results, write_image

pytestmark = pytest.mark.slow


def _images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for k in range(3):
        for i in range(14):
            write_image(root / f"c{k}" / f"{i}.png", k, rng)
    return root


def _run(module: str, args: list[str], cwd: Path, address: str):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": address}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    yield c
    c.shutdown()


def test_search_spreads_trials_over_nodes_and_ensemble_builds(cluster, tmp_path):
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    storage = tmp_path / "shared"
    args = ["--data", str(_images(tmp_path / "images")), "--image-size", "32",
            "--num-samples", "4", "--max-epochs", "1", "--space", "batch_size=[8]",
            "--experiment", "multi", "--storage", str(storage), "--init", "random",
            "--no-refit"]
    proc = _run("search.run", args, tmp_path, cluster.address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trial(s) at once" in proc.stderr
    table = read_results(storage / "multi" / "results.csv")
    assert set(table["node_id"]) == {cluster.head_node.node_id, worker.node_id}
    for ckpt in table["checkpoint"]:
        assert (storage / "multi" / ckpt).is_file()
    built = _run("ensemble.build", ["--experiment", "multi", "--storage", str(storage),
                                    "--top", "2"], tmp_path, cluster.address)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (storage / "multi" / "ensemble" / "ensemble.pt").is_file()


def test_fractional_gpus_place_trials_on_gpu_nodes_only(cluster, tmp_path):
    gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    args = ["--data", str(_images(tmp_path / "images")), "--image-size", "32",
            "--num-samples", "4", "--max-epochs", "1", "--space", "batch_size=[8]",
            "--gpus-per-worker", "0.5", "--cpus-per-worker", "0.25", "--experiment", "gpu",
            "--storage", str(tmp_path / "runs"), "--init", "random", "--no-refit"]
    proc = _run("search.run", args, tmp_path, cluster.address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 trial(s) at once" in proc.stderr and "0.5 GPU per worker" in proc.stderr
    table = pd.read_csv(tmp_path / "runs" / "gpu" / "results.csv",
                        dtype={"gpu_ids": str, "trial_id": str})
    assert len(table) == 4
    assert set(table["node_id"]) <= {n.node_id for n in gpu_nodes}
    assert table["gpu_ids"].notna().all()  # each trial was given a (logical) GPU by Ray


def test_ddp_workers_each_get_their_own_device_from_ray_train(tmp_path):
    """Two DDP workers on a node with two (logical) GPUs: Ray Train gives each its own GPU, and
    `worker_device` (what every DDP trial trains on) maps each to its own cuda index."""
    import json

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tmp_path / "devices"
    out.mkdir()

    def loop(_config):
        import ray.train

        from trainables.train import worker_device

        ctx = ray.train.get_context()
        (out / f"rank{ctx.get_world_rank()}.json").write_text(json.dumps({
            "device": str(worker_device(ctx.get_world_size())),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")}))

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=2, use_gpu=True),
                     torch_config=TorchConfig(backend="gloo"),  # no CUDA here for NCCL
                     run_config=RunConfig(name="devices", storage_path=str(tmp_path))).fit()
    finally:
        ray.shutdown()
    got = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(g["device"] for g in got) == ["cuda:0", "cuda:1"]
    assert sorted(g for w in got for g in w["gpu_ids"]) == ["0", "1"]  # one GPU each
    for w in got:  # the device is the worker's own GPU's place among the visible ones
        (gpu,) = w["gpu_ids"]
        assert w["device"] == f"cuda:{w['visible'].split(',').index(gpu)}"
