"""EAT on a real Ray: logical GPUs, two nodes, a mode registered in a test, a member killed mid-run, --resume.

Every test compares with :class:`rdml.ensemble.LocalEnsemble` (the same members stepped in turn in
this process, exchanging the same records): the Ray ensemble takes identical steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_ensemble import eat_config as tiny_eat_config

from rdml.config import build_config
from rdml.data import build_datasets
from rdml.ensemble import LocalEnsemble, load_manifest, train_ensemble


def eat_config(tmp_path: Path, **ensemble) -> object:
    """The unit tests' tiny EAT config, run for 3 epochs of 2 steps with a checkpoint every epoch."""
    ensemble = {"steps_per_epoch": 2, **ensemble}
    return tiny_eat_config(tmp_path, train={"epochs": 3, "checkpoint_every": 1, "device": "cpu"}, **ensemble)


@pytest.fixture(scope="module")
def splits():
    return build_datasets(build_config({}).data)


def _local_losses(cfg, splits, steps: int) -> list[list[float]]:
    torch.set_num_threads(1)
    local = LocalEnsemble(cfg, splits.train)
    return [[m["loss"] for m in local.step(s)] for s in range(steps)]


@pytest.mark.slow
def test_member_actors_own_a_logical_gpu_and_match_in_process(ray_local, tmp_path, splits):
    from rdml.distributed.eat import RayEnsemble

    cfg = eat_config(tmp_path, members=3, parts=3)
    backend = RayEnsemble(cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "auto"})}),
                          splits.train)
    try:
        info = backend.info()
        assert sorted(i["cuda_visible_devices"] for i in info) == ["0", "1", "2"]  # one logical GPU each
        assert all(len(i["gpu_ids"]) == 1 and i["device"] == "cpu" and i["threads"] == 1 for i in info)
        assert len({i["pid"] for i in info}) == 3
        ray_losses = [[m["loss"] for m in backend.step(s)] for s in range(2)]
        timing = backend.timing
        assert timing["bytes"] > 0 and timing["get"] >= 0  # member weights went through the object store
        assert all(i["stats_reads"] == 2 * 2 for i in backend.info())  # 2 steps x the 2 other members' weights
    finally:
        backend.shutdown()
    local = _local_losses(cfg, splits, 2)
    assert ray_losses == local  # the same float32 weights exchanged: identical steps


@pytest.mark.slow
def test_a_mode_registered_in_a_test_runs_on_ray_unchanged(ray_local, tmp_path, splits):
    """The dummy mode of test_ensemble_modes, defined in the driver only: shipped to the actors, same steps."""
    from test_ensemble_modes import dummy_mode

    from rdml.distributed.eat import RayEnsemble
    from rdml.ensemble import SELF_TRANSFER

    dummy_mode()
    try:
        cfg = eat_config(tmp_path, self_transfer="echo_test")
        backend = RayEnsemble(cfg, splits.train)
        try:
            ray_rows = [backend.step(s) for s in range(2)]
            reads = [i["stats_reads"] for i in backend.info()]
        finally:
            backend.shutdown()
        local = LocalEnsemble(cfg, splits.train)
        local_rows = [local.step(s) for s in range(2)]
    finally:
        SELF_TRANSFER.pop("echo_test", None)
    assert ray_rows == local_rows and reads == [2, 2]
    assert all("loss_transfer" in m for row in ray_rows for m in row)


_TWO_NODES = textwrap.dedent("""
    import json, os, sys
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray, torch
    from ray.cluster_utils import Cluster
    sys.path.insert(0, sys.argv[1])
    from test_eat_distributed import eat_config, _local_losses
    from pathlib import Path
    from rdml.config import build_config
    from rdml.data import build_datasets
    from rdml.distributed.eat import RayEnsemble

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = eat_config(Path(sys.argv[2]), members=2, parts=2, self_transfer="cross_member", placement="SPREAD")
    splits = build_datasets(build_config({}).data)
    backend = RayEnsemble(cfg, splits.train)
    losses = [[m["loss"] for m in backend.step(s)] for s in range(3)]
    info = backend.info()
    backend.shutdown()
    ray.shutdown()
    cluster.shutdown()
    print("RESULT" + json.dumps({"info": info, "ray": losses, "local": _local_losses(cfg, splits, 3)}))
""")


@pytest.mark.slow
def test_two_node_cluster_members_exchange_statistics_across_nodes(tmp_path):
    """A real two-node cluster (in a subprocess: it cannot share this process with the session Ray)."""
    script = tmp_path / "two_nodes.py"
    script.write_text(_TWO_NODES)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), str(tmp_path)],
                          capture_output=True, text=True, timeout=400, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT"):])
    assert len({i["node_id"] for i in out["info"]}) == 2  # SPREAD: one member per node
    assert all(i["stats_reads"] == 2 for i in out["info"])  # each read the other's record at steps 1 and 2
    assert out["ray"] == out["local"]  # records crossed nodes intact: identical to in-process


@pytest.mark.slow
def test_killed_member_and_stopped_driver_lose_only_steps_since_checkpoint(ray_local, tmp_path, splits):
    """Stop the driver after 3 steps, resume with fresh actors, kill a member mid-run: same 6 steps."""
    import ray

    from rdml.distributed.eat import RayEnsemble

    cfg = eat_config(tmp_path)
    run_dir = tmp_path / "run"
    first = RayEnsemble(cfg, splits.train)
    try:
        stopped = train_ensemble(cfg, first, splits, run_dir, stop_after=3)
    finally:
        first.shutdown()  # the driver is gone; its actors with it
    assert stopped.steps == 3 and load_manifest(run_dir).step == 2

    second = RayEnsemble(cfg, splits.train)
    killed = []

    def kill_at_step_4(metrics, step):
        if step == 4 and not killed and "train/loss" in metrics:
            ray.kill(second.actors[1], no_restart=False)
            killed.append(step)
            # ray.kill is asynchronous: on a loaded machine the training could otherwise run on (or end)
            # before the kill lands. Wait until the member is gone or already restarted.
            while True:
                try:
                    if ray.get(second.actors[1].info.remote(), timeout=30)["restarted"]:
                        break
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.GetTimeoutError):
                    break
                time.sleep(0.05)

    try:
        result = train_ensemble(cfg, second, splits, run_dir, resume=run_dir, log=kill_at_step_4)
        info = second.info()
    finally:
        second.shutdown()
    assert killed == [4] and result.recoveries == 1 and result.steps == 6
    assert info[1]["restarted"] and not info[0]["restarted"]
    assert [h["step"] for h in result.history] == [3, 4, 5, 6]  # the kill hit the step-4 checkpoint: 3, 4 replayed from step 2
    assert load_manifest(run_dir).step == 6

    reference = LocalEnsemble(cfg, splits.train)
    torch.set_num_threads(1)
    straight = train_ensemble(cfg, reference, splits, tmp_path / "straight")
    assert [h["train/loss"] for h in result.history] == [h["train/loss"] for h in straight.history[2:]]
    assert result.metrics["ensemble/recall@1"] == straight.metrics["ensemble/recall@1"]
