"""cluster.yaml and docker/ checked offline with Ray's own cluster-config schema."""

from __future__ import annotations

import copy
import re

import jsonschema
import pytest
import yaml

from conftest import REPO
from search.config import parse_config
from search.resources import plan_resources
from trainables.errors import UserError
from trainables.jobs import autoscaling_capacity


def _pinned(name: str) -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(rf'"{re.escape(name)}(?:\[[^\]]*\])?==([^"]+)"', text).group(1)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def test_ray_accepts_the_config(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_schema_catches_mistakes(raw):
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        validate_config(prepare_config(bad))


def test_every_node_type_has_integer_resources(prepared):
    for name, node in prepared["available_node_types"].items():
        assert node["resources"], name
        for key, value in node["resources"].items():
            assert isinstance(value, int) and not isinstance(value, bool), (name, key, value)


def test_gpu_pool_autoscales_from_zero_on_spot(prepared):
    workers = {k: v for k, v in prepared["available_node_types"].items()
               if k != prepared["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    assert gpu and all(v["min_workers"] == 0 and v["max_workers"] >= 1 for v in gpu)
    assert any(v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
               for v in gpu)
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0


def test_image_matches_pinned_ray_and_python(raw):
    ray_version = _pinned("ray")
    assert f"ray{ray_version}-py311-gpu" in raw["docker"]["image"]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert base == f"rayproject/ray:{ray_version}-py311-gpu"
    assert "ray-ml" not in base


def test_shared_storage_and_mlflow_on_the_head(raw):
    opts = " ".join(raw["docker"]["run_options"])
    mount = re.search(r"-v (\S+):(\S+)", opts)
    storage = re.search(r"-e IMGSEARCH_STORAGE=(\S+)", opts).group(1)
    assert storage.startswith(mount.group(2))
    init = " ".join(raw["initialization_commands"])
    assert "mount -t nfs4" in init and mount.group(1) in init
    head = " ".join(raw["head_start_ray_commands"])
    assert "mlflow server" in head and "--host 127.0.0.1" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in opts


def test_gpu_search_is_planned_against_what_the_autoscaler_can_add(prepared):
    capacity = autoscaling_capacity(prepared)
    assert capacity[0]["GPU"] == 8
    cfg = parse_config(["--gpus-per-worker", "1", "--cpus-per-worker", "4"])
    head_only = ({"CPU": 8.0}, [{"CPU": 8.0}])
    with pytest.raises(UserError):
        plan_resources(cfg, *head_only)
    plan = plan_resources(cfg, *head_only, capacity=capacity)
    assert plan.concurrency == 8 and plan.gpus_per_worker == 1


def test_shared_storage_is_not_world_writable():
    """Checkpoints on the shared storage are loaded by every search and build: only the image's
    user may write there."""
    text = (REPO / "cluster.yaml").read_text()
    assert not re.search(r"chmod\s+(-R\s+)?(0?7[0-7]7|a\+w|o\+w)", text)
    assert "chown 1000:100 /mnt/efs" in text and "chmod 0750 /mnt/efs" in text


def test_the_image_holds_every_package_of_the_project():
    """A new package (models/ was one) must reach the cluster image, or every node fails on
    its first import."""
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.search(r"include = \[(.*?)\]", pyproject).group(1)
    for name in re.findall(r'"(\w+)\*"', packages):
        assert re.search(rf"^COPY .* {name} {name}$", dockerfile, re.M), name
        assert f"{name}/__init__.py" in dockerfile, name
