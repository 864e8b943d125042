"""`ray job submit` against a real head node (its own process group), through the CLI and the SDK."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A head node started with `ray start --head --block`; only this process tree is ended afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rdj")  # short: Ray's socket paths are length-limited
    dash, gcs = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--port", str(gcs), "--num-cpus", "2", "--num-gpus", "2",
           "--include-dashboard=true", "--temp-dir", temp_dir, "--ray-client-server-port", str(_free_port()),
           "--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
           "--runtime-env-agent-port", str(_free_port()), "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited: {(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("the Ray dashboard did not answer within 120 s")
    yield url, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _tiny(tmp_path: Path, name: str) -> list[str]:
    sets = ["train.epochs=1", "train.max_steps_per_epoch=2", "data.batch_pairs=8", "model.embedding_dim=16",
            "data.limit_test=100", "ensemble.members=2", "ensemble.parts=2", "ensemble.cpus_per_member=0.5",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.experiment={name}",
            f"train.output_dir={tmp_path / 'runs'}", "tracking.log_model=false"]
    return [a for s in sets for a in ("--set", s)] + ["--config", "digits", "--no-attacks"]


def _runs(tmp_path: Path, experiment: str):
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"the job created no MLflow experiment {experiment}"
    return c.search_runs([exp.experiment_id])


def test_ensemble_job_via_cli_and_sdk(ray_head, tmp_path):
    url, env = ray_head
    cli = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".",
         "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/ensemble.py", *_tiny(tmp_path, "job-cli")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert cli.returncode == 0, cli.stdout[-4000:] + cli.stderr[-2000:]
    assert "succeeded" in (cli.stdout + cli.stderr).lower()
    runs = _runs(tmp_path, "job-cli")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["ensemble.members"] == "2"

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    import yaml

    runtime_env = yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(ROOT)
    job_id = client.submit_job(
        entrypoint="python jobs/ensemble.py " + " ".join(_tiny(tmp_path, "job-sdk")), runtime_env=runtime_env
    )
    deadline = time.time() + 400
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-4000:]
    logs = client.get_job_logs(job_id)
    runs = _runs(tmp_path, "job-sdk")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", logs[-3000:]
    # the job joined the head node's cluster instead of starting its own Ray
    assert "Started a local Ray instance" not in logs


def test_jobs_join_the_cluster_named_by_ray_address(monkeypatch):
    """Inside `ray job submit` RAY_ADDRESS names the cluster; an explicit address still wins."""
    from rdml.config import build_config
    from rdml.distributed.connect import resolve_address

    cfg = build_config()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert resolve_address(cfg) == "127.0.0.1:6379"
    assert resolve_address(cfg, "ray://h:10001") == "ray://h:10001"
    assert resolve_address(build_config({"ray": {"address": "auto"}})) == "auto"
    monkeypatch.delenv("RAY_ADDRESS")
    assert resolve_address(cfg) is None
