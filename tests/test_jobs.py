"""Ray jobs the way docs/cluster.md submits them, on a head node whose Python does NOT have rdml installed.

The head node runs a fresh venv whose only link to the project's environment is a ``.pth`` line
naming its site-packages directory: every dependency imports, but the editable-install finder (a
``.pth`` *inside* that directory) is not processed, so ``import rdml`` fails there (checked below).
Whatever rdml the jobs use must therefore come from the uploaded working dir. Outputs go to a
"shared" directory and a real ``mlflow server``; nothing may be written into Ray's working-dir cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runtime_env() -> dict:
    return yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())


def _packaged_files(tmp_path: Path) -> set[str]:
    """The files Ray uploads for ``--working-dir . --runtime-env jobs/runtime_env.yaml`` (Ray's own packer)."""
    from ray._private.runtime_env.packaging import _zip_files

    out = tmp_path / "pkg.zip"
    _zip_files(str(ROOT), _runtime_env()["excludes"], str(out), include_gitignore=True)
    return {n for n in zipfile.ZipFile(out).namelist() if not n.endswith("/")}


def test_runtime_env_uploads_the_whole_package(tmp_path):
    """`data/` used to match rdml/data/ too: every module of the package must be in the upload."""
    files = _packaged_files(tmp_path)
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rdml").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".yaml")}
    assert "rdml/data/__init__.py" in files and package <= files
    assert {"jobs/_entry.py", "jobs/ensemble.py", "jobs/evaluate.py", "jobs/runtime_env.yaml"} <= files
    assert not {f for f in files if f.split("/")[0] in (".venv", ".git", "runs", "data", "mlruns", "mlartifacts")}
    assert not {f for f in files if f.endswith((".db", ".pyc"))}


def test_temporary_ray_locations_are_refused_only_inside_a_job(tmp_path, monkeypatch):
    from rdml.errors import RdmlError, TrackingError
    from rdml.jobenv import JOB_ENV_VAR, require_durable_dir, require_durable_store, temporary_location

    temp = tmp_path / "ray-temp"  # Ray's temp dir layout: session_<x>/runtime_resources/working_dir_files/...
    cache = temp / "session_2026_01_01" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    cache.mkdir(parents=True)
    (temp / "session_latest").symlink_to(temp / "session_2026_01_01")
    assert "runtime-env cache" in temporary_location(cache / "runs")
    assert "temporary directory" in temporary_location(temp / "session_2026_01_01" / "logs")
    assert temporary_location(tmp_path / "shared" / "runs") is None

    monkeypatch.chdir(cache)
    monkeypatch.delenv(JOB_ENV_VAR, raising=False)
    with pytest.raises(RdmlError, match="train.output_dir=/shared"):  # a CWD in the cache is a job too
        require_durable_dir("runs", "its checkpoints", "Use --set train.output_dir=/shared/x.")
    monkeypatch.chdir(tmp_path)
    require_durable_dir(cache / "runs", "its checkpoints", "")  # not in a job: a local run may write anywhere
    monkeypatch.setenv(JOB_ENV_VAR, '{"runtime_env": {}}')
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI") as err:
        require_durable_store(f"sqlite:///{cache / 'mlflow.db'}")
    assert "tracking.uri=http://" in str(err.value)
    require_durable_store(f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}")
    require_durable_store("http://mlflow.internal:5000")
    require_durable_dir(tmp_path / "shared" / "runs", "its checkpoints", "")


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


# ---- a head node without rdml ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A venv with rdml's dependencies (via a .pth line) but without rdml."""
    root = tmp_path_factory.mktemp("bare-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "_deps_of_rdml.pth").write_text("".join(f"{d}\n" for d in deps))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ok = subprocess.run([str(python), "-c", "import ray, mlflow, torch, faiss, yaml"], cwd=root, env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    no_rdml = subprocess.run([str(python), "-c", "import rdml"], cwd=root, env=env, capture_output=True, text=True)
    assert no_rdml.returncode != 0 and "No module named 'rdml'" in no_rdml.stderr
    return python


@pytest.fixture(scope="module")
def bare_head(bare_python, tmp_path_factory):
    """`ray start --head --block` run by the bare Python; only this process group is ended afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rdj")  # short: Ray's socket paths are length-limited
    home = tmp_path_factory.mktemp("head-cwd")
    dash, gcs = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               PATH=f"{bare_python.parent}{os.pathsep}{env.get('PATH', '')}")  # a job's `python` is the bare one
    cmd = [str(bare_python), "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address",
           "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--port", str(gcs),
           "--num-cpus", "2", "--include-dashboard=true", "--temp-dir", temp_dir,
           "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
           "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port()),
           "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
    client_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    client_env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    yield url, client_env, Path(temp_dir)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _tiny(shared: Path | None, tracking_uri: str | None, experiment: str) -> list[str]:
    """Arguments of a tiny `rdml ensemble`; ``shared`` None: the default (relative) train.output_dir."""
    sets = ["train.epochs=1", "ensemble.steps_per_epoch=2", "data.batch_pairs=8", "model.embedding_dim=16",
            "data.limit_test=100", "ensemble.parts=2", "ensemble.cpus_per_member=0.5", "defense.pgd.steps=1",
            f"tracking.experiment={experiment}"]
    if shared is not None:
        sets.append(f"train.output_dir={shared / 'runs'}")
    if tracking_uri:
        sets.append(f"tracking.uri={tracking_uri}")
    return ["--config", "digits", "--members", "2", "--no-attacks", *[a for s in sets for a in ("--set", s)]]


def _submit_cli(url: str, env: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    """The literal command of docs/cluster.md, run from the repository root."""
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--runtime-env",
         "jobs/runtime_env.yaml", "--", "python", *entrypoint],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )


def _submit_sdk(url: str, entrypoint: str) -> tuple[str, str]:
    """The SDK form of the same submission; returns (final status, logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={**_runtime_env(), "working_dir": str(ROOT)})
    deadline = time.time() + 300
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    return str(status), client.get_job_logs(job_id)


def _cache_files(temp_dir: Path) -> dict[str, set[str]]:
    """Every file under the session's working-dir cache, per unpacked package."""
    out: dict[str, set[str]] = {}
    for pkg in (temp_dir / "session_latest" / "runtime_resources" / "working_dir_files").glob("*"):
        out[pkg.name] = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()}
    return out


@pytest.mark.slow
def test_jobs_run_where_rdml_is_not_installed_and_keep_their_outputs(bare_head, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from rdml.tracking import load_logged_model, logged_models

    url, env, temp_dir = bare_head
    shared = tmp_path / "shared"  # stands for a file system every node mounts
    experiment = f"jobs-{uuid.uuid4().hex[:8]}"
    c = MlflowClient(mlflow_server)

    # the job's rdml is the uploaded one, imported by the bare Python
    status, logs = _submit_sdk(url, """python -c 'import rdml, sys; print("RDML", rdml.__file__, sys.executable)'""")
    line = next((ln for ln in logs.splitlines() if ln.startswith("RDML ")), "")
    assert status == "SUCCEEDED" and "runtime_resources/working_dir_files" in line and "bare-venv" in line, logs[-2000:]

    # 1. the documented ensemble job: checkpoints on the shared path, run + checkpoints + model on the server
    ens = _submit_cli(url, env, "jobs/ensemble.py", *_tiny(shared, mlflow_server, experiment))
    assert ens.returncode == 0 and "succeeded" in (ens.stdout + ens.stderr).lower(), ens.stdout[-4000:] + ens.stderr[-2000:]
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["ensemble.members"] == "2"
    run_dir = next((shared / "runs").glob("*/manifest.json")).parent
    manifest = json.loads((run_dir / "manifest.json").read_text())
    artifacts = {f.path for d in ("checkpoints", f"checkpoints/{Path(manifest['files'][0]).parent}")
                 for f in c.list_artifacts(run.info.run_id, d)}
    assert {"checkpoints/manifest.json", *(f"checkpoints/{f}" for f in manifest["files"])} <= artifacts
    assert len(manifest["files"]) == 2 and manifest["step"] == 2
    models = logged_models(run.info.run_id, mlflow_server)
    assert [(m.name, m.experiment_id) for m in models] == [("model", exp.experiment_id)]
    ensemble = load_logged_model(f"models:/{models[0].model_id}", tracking=mlflow_server)
    assert len(ensemble.members) == 2

    # 2. the documented evaluate job on that run directory, tracked to the same server
    ev = _submit_cli(url, env, "jobs/evaluate.py", str(run_dir), "--track", "--quiet",
                     "--json", str(shared / "eval" / "metrics.json"))
    assert ev.returncode == 0, ev.stdout[-4000:] + ev.stderr[-2000:]
    evals = [r for r in c.search_runs([exp.experiment_id]) if r.info.run_id != run.info.run_id]
    assert len(evals) == 1 and evals[0].info.status == "FINISHED" and "recall_at_1" in evals[0].data.metrics
    assert "evaluation/metrics.json" in {f.path for f in c.list_artifacts(evals[0].info.run_id, "evaluation")}
    assert (shared / "eval" / "metrics.json").is_file()

    # 3. outputs that would land in the working-dir cache: refused at start-up, before any run exists
    t0 = time.time()
    status, logs = _submit_sdk(url, "python jobs/ensemble.py " + " ".join(_tiny(None, mlflow_server, experiment + "-x")))
    assert status == "FAILED" and "inside a Ray job" in logs and "train.output_dir=/shared" in logs, logs[-3000:]
    status, logs = _submit_sdk(url, "python jobs/ensemble.py " + " ".join(_tiny(shared, None, experiment + "-y")))
    assert status == "FAILED" and "runtime-env cache" in logs and "MLFLOW_TRACKING_URI" in logs, logs[-3000:]
    assert "Traceback" not in logs and time.time() - t0 < 120
    assert c.get_experiment_by_name(experiment + "-x") is None and c.get_experiment_by_name(experiment + "-y") is None

    # nothing was written into the working-dir cache: it holds exactly what was uploaded
    uploaded = _packaged_files(tmp_path)
    for pkg, files in _cache_files(temp_dir).items():
        assert files <= uploaded, f"written into the cache {pkg}: {sorted(files - uploaded)[:10]}"
