"""Cluster configs: the launcher YAML against Ray's own autoscaler schema; KubeRay manifests' shape."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_yaml_validates_against_rays_schema():
    cfg = yaml.safe_load((ROOT / "cluster/aws-gpu.yaml").read_text())
    jsonschema.validate(cfg, _schema())
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_groups = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_groups and all(t["min_workers"] <= t["max_workers"] <= cfg["max_workers"] for t in gpu_groups)
    setup = " ".join(cfg["setup_commands"])
    assert 'pip install' in setup and '".[gpu,all]"' in setup and "constraints.txt" in setup and "~/rdml" in cfg["file_mounts"]
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:])


def test_schema_check_is_not_vacuous():
    cfg = yaml.safe_load((ROOT / "cluster/aws-gpu.yaml").read_text())
    cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, _schema())


def _gpu_limit(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def _check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        containers = g["template"]["spec"]["containers"]
        assert all(_gpu_limit(c) == 1 for c in containers)
    for c in [head["template"]["spec"]["containers"][0]] + [c for g in groups for c in g["template"]["spec"]["containers"]]:
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in env


def test_kuberay_raycluster_manifest():
    doc = yaml.safe_load((ROOT / "cluster/kuberay/raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


def test_kuberay_rayjob_runs_the_ensemble_entrypoint():
    doc = yaml.safe_load((ROOT / "cluster/kuberay/rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("jobs/ensemble.py")
    assert (ROOT / "jobs/ensemble.py").exists()
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    _check_cluster_spec(doc["spec"]["rayClusterSpec"])
    # the entrypoint's arguments are ones `rdml ensemble` accepts
    from rdml.cli import build_parser

    args = build_parser().parse_args(["ensemble", *argv[2:]])
    assert args.members == 3


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())
    RuntimeEnv(**env, working_dir=str(ROOT))
    assert "/.venv/" in env["excludes"] and "data/" not in env["excludes"]  # anchored: rdml/data/ is shipped
