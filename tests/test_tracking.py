"""rdml.tracking against a real MLflow server process and a real sqlite store."""

from __future__ import annotations

import json
import os
import pickle
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.entities import LoggedModelStatus

from rdml.config import build_config
from rdml.errors import TrackingError
from rdml.models import build_model
from rdml.tracking import (
    NullLogger,
    RunLogger,
    child_runs,
    download_artifact,
    end_run,
    end_run_if_running,
    list_artifacts,
    load_logged_model,
    log_artifact,
    log_dict,
    log_embedding_plot,
    log_figure,
    log_metrics,
    log_model,
    log_training_plots,
    logged_models,
    make_logger,
    metric_key,
    model_spec,
    resolve_uri,
    resume_run,
    run_status,
    start_run,
)
from rdml.tracking.plots import loss_figure


@dataclass
class _Result:
    metrics: dict
    checkpoint: Path | None = None
    history: list = field(default_factory=list)


def _cfg(uri: str, **tracking):
    return build_config({"name": "track-test", "train": {"epochs": 3},
                         "tracking": {"uri": uri, "experiment": "tracking-tests", **tracking}})


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_metric_key_sanitises_mlflow_forbidden_characters():
    assert metric_key("eval/recall@1") == "eval/recall_at_1"
    assert metric_key("train/loss") == "train/loss"
    assert metric_key("a%b") == "a_b"


def test_full_run_round_trip_through_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the CWD (MLflow's Default experiment used to: ./mlruns/0)
    cfg = _cfg(mlflow_server)
    run_id = start_run(cfg, tags={"purpose": "test"})
    c = _client(mlflow_server)
    run = c.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["defense.pgd.steps"] == str(cfg.defense.pgd.steps)
    assert run.data.tags["purpose"] == "test"

    logger = RunLogger(run_id, cfg.tracking, log_every_steps=2)
    logger.on_train_start(cfg)
    history = []
    for epoch in range(3):
        for step in range(epoch * 4, epoch * 4 + 4):
            logger.on_step(step, {"loss": 1.0 / (step + 1), "passes": 9})
        m = {"train/loss": 1.0 - 0.2 * epoch, "eval/recall@1": 0.5 + 0.1 * epoch, "eval/nmi": 0.4 + 0.05 * epoch}
        logger.on_epoch_end(epoch, m)
        history.append({"epoch": epoch, **m})
    ckpt = tmp_path / "last.pt"
    torch.save({"x": 1}, ckpt)
    logger.on_checkpoint(ckpt)
    logger.final_artifacts = False  # no rdml checkpoint here; the model is logged explicitly below
    logger.on_train_end(_Result(metrics={"recall@1": 0.7}, checkpoint=ckpt, history=history))

    hist = c.get_metric_history(run_id, "eval/recall_at_1")
    assert [(m.step, round(m.value, 3)) for m in hist] == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert len(c.get_metric_history(run_id, "train/loss")) >= 3
    assert [m.step for m in c.get_metric_history(run_id, "step/passes")] == [0, 2, 4, 6, 8, 10]
    assert c.get_run(run_id).data.metrics["final/recall_at_1"] == pytest.approx(0.7)

    log_dict(run_id, {"a": 1, "b": [1, 2]}, "extra/info.json")
    log_figure(run_id, loss_figure(history), "plots/custom.png")
    rng = np.random.default_rng(0)
    log_embedding_plot(run_id, rng.normal(size=(60, 8)), rng.integers(0, 5, size=60))
    model_cfg = build_config({"model": {"arch": "c2f2", "embedding_dim": 8}})
    model = build_model(model_cfg.model, 1, 28).eval()
    model_uri = log_model(run_id, model, spec=model_spec(model_cfg, 1, 28))

    names = set(list_artifacts(run_id)) | set(list_artifacts(run_id, "plots")) | set(list_artifacts(run_id, "checkpoints"))
    assert {"config.yaml", "plots/loss.png", "plots/recall_nmi.png", "plots/embedding_pca.png", "plots/custom.png",
            "checkpoints/last.pt"} <= names
    assert "train:\n  epochs: 3" in download_artifact(run_id, "config.yaml").read_text()
    assert json.loads(download_artifact(run_id, "extra/info.json").read_text()) == {"a": 1, "b": [1, 2]}
    assert download_artifact(run_id, "plots/embedding_pca.png").read_bytes()[:4] == b"\x89PNG"

    # the logged model belongs to the run's own experiment and is the run's output ("Logged models (1)")
    run = c.get_run(run_id)
    models = logged_models(run_id)
    assert [(m.name, m.experiment_id, m.status.to_int()) for m in models] == [
        ("model", run.info.experiment_id, LoggedModelStatus.READY.to_int())]
    assert run.info.experiment_id != "0" and model_uri == f"models:/{models[0].model_id}"
    assert [o.model_id for o in run.outputs.model_outputs] == [models[0].model_id]
    loaded = load_logged_model(model_uri, run_id)
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(loaded(x), model(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]

    end_run(run_id)
    assert run_status(run_id) == "FINISHED"
    assert not end_run_if_running(run_id, "KILLED")


def test_child_runs_and_statuses_with_sqlite_store(mlflow_uri):
    cfg = _cfg(mlflow_uri)
    parent = start_run(cfg, run_name="search")
    kids = [start_run(cfg, parent_run_id=parent, nested=True, run_name=f"trial-{i}") for i in range(2)]
    log_metrics(kids[0], {"recall@1": 0.5, "note": "text is skipped", "flag": True}, step=1)
    end_run(kids[0], "FAILED")
    assert end_run_if_running(kids[1], "KILLED")
    end_run(parent)
    found = {r.info.run_id: r.info.status for r in child_runs(parent)}
    assert found == {kids[0]: "FAILED", kids[1]: "KILLED"}
    metrics = _client(mlflow_uri).get_run(kids[0]).data.metrics
    assert metrics == {"recall_at_1": 0.5, "flag": 1.0}
    # artifacts of a local sqlite store live next to the database, not in the CWD
    db_dir = Path(mlflow_uri[len("sqlite:///"):]).parent
    assert any((db_dir / "mlartifacts").rglob("config.yaml"))
    log_artifact(parent, db_dir / "mlflow.db", "copies")
    assert "copies/mlflow.db" in list_artifacts(parent, "copies")


def test_default_uri_is_sqlite_in_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_uri(None) == "http://example:5000"
    assert resolve_uri("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(TrackingError, match="sqlite"):
        resolve_uri(str(tmp_path / "mlruns"))
    with pytest.raises(TrackingError, match=f"sqlite:///{tmp_path / 'mlruns'}/mlflow.db"):  # a file:// URI too
        resolve_uri(f"file://{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-out is honoured
    assert resolve_uri(f"file://{tmp_path}") == f"file://{tmp_path}"


def test_unreachable_server_fails_fast_with_the_fix():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as err:
        start_run(_cfg(uri))
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert uri in msg and "rdml ui" in msg and "tracking.uri" in msg


def test_disabled_tracking_is_a_no_op(tmp_path):
    cfg = _cfg(f"sqlite:///{tmp_path / 'never.db'}", enabled=False)
    run_id = start_run(cfg)
    assert run_id is None
    logger = make_logger(run_id, cfg.tracking)
    assert isinstance(logger, NullLogger)
    logger.on_epoch_end(0, {"loss": 1.0})
    log_metrics(None, {"x": 1.0})
    log_training_plots(None, [{"loss": 1.0}])
    end_run(None)
    assert not (tmp_path / "never.db").exists()


def test_run_logger_pickles_and_logs_from_a_ray_worker(ray_local, mlflow_uri):
    cfg = _cfg(mlflow_uri)
    run_id = start_run(cfg)
    logger = pickle.loads(pickle.dumps(RunLogger(run_id, cfg.tracking)))

    @ray_local.remote(num_cpus=0.5)
    def train_in_worker(lg):
        from types import SimpleNamespace

        os.chdir("/")  # a worker's CWD differs: the logger must not depend on it
        for epoch in range(2):
            lg.on_epoch_end(epoch, {"eval/recall@1": 0.1 * (epoch + 1)})
        lg.on_train_end(SimpleNamespace(metrics={}, checkpoint=None, history=[]))
        return True

    assert ray_local.get(train_in_worker.remote(logger), timeout=600)  # generous: a loaded 2-core CI box
    end_run(run_id)
    hist = _client(mlflow_uri).get_metric_history(run_id, "eval/recall_at_1")
    assert [round(m.value, 2) for m in hist] == [0.1, 0.2]
    assert "plots/loss.png" in list_artifacts(run_id, "plots")


def test_logged_model_is_read_without_unpickling(mlflow_uri, tmp_path):
    """A tampered rdml/state_dict.pt (a pickle that runs code) is refused; its payload never runs."""
    cfg = _cfg(mlflow_uri)
    run_id = start_run(cfg)
    model = build_model(build_config({"model": {"arch": "c2f2", "embedding_dim": 8}}).model, 1, 28)
    model_uri = log_model(run_id, model, spec=model_spec(cfg, 1, 28))
    # MLflow's temporary fluent URI used to delete $MLFLOW_TRACKING_URI: later calls then opened ./mlflow.db
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_uri
    weights = next(Path(mlflow_uri[len("sqlite:///"):]).parent.rglob("rdml/state_dict.pt"))
    marker = tmp_path / "payload-ran"
    torch.save({"w": _Payload(str(marker))}, weights)  # what an attacker with write access to the store could do
    with pytest.raises(TrackingError, match="weights_only") as err:
        load_logged_model(model_uri, run_id)
    assert "state_dict.pt" in str(err.value) or "rdml model files" in str(err.value)
    assert not marker.exists()
    with pytest.raises(TrackingError, match="models:/"):
        load_logged_model(f"runs:/{run_id}/model", run_id)


class _Payload:
    """Unpickling this object creates a marker file (a stand-in for arbitrary code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_resume_run_reopens_the_same_run_or_links_a_new_one(mlflow_uri):
    cfg = _cfg(mlflow_uri)
    run_id = start_run(cfg)
    log_metrics(run_id, {"loss": 1.0}, step=1)
    end_run(run_id, "KILLED")
    more_epochs = build_config({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "epochs": 6}})
    assert resume_run(more_epochs, run_id, tags={"rdml.kind": "test"}) == run_id
    run = _client(mlflow_uri).get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params["train.epochs"] == "3"  # params are immutable: the change is a tag
    assert run.data.tags["rdml.resumed.train.epochs"] == "6" and run.data.tags["rdml.resumes"] == "1"
    log_metrics(run_id, {"loss": 0.5}, step=2)
    end_run(run_id)
    assert [m.step for m in _client(mlflow_uri).get_metric_history(run_id, "loss")] == [1, 2]
    other = resume_run(cfg, "0123456789abcdef0123456789abcdef")  # unknown to this store
    assert other != run_id
    assert _client(mlflow_uri).get_run(other).data.tags["rdml.resumed_from"] == "0123456789abcdef0123456789abcdef"
    end_run(other)


def test_ui_options_are_validated_and_passed_to_mlflow(tmp_path, capsys):
    import argparse

    from rdml.commands import ui

    parser = argparse.ArgumentParser(prog="rdml ui")
    ui.add_arguments(parser)
    for bad in ("0", "99999", "http"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--port", bad])
        assert exit_.value.code == 2
    assert "port number 1-65535" in capsys.readouterr().err
    hosts = ui.expand_allowed_hosts("mlflow.internal, 10.0.0.5:80,app-*.x,[::1]", 5000).split(",")
    assert hosts[:6] == ["mlflow.internal", "mlflow.internal:5000", "10.0.0.5:80", "app-*.x", "[::1]", "[::1]:5000"]
    assert {"localhost:*", "127.0.0.1:*", "10.*"} <= set(hosts)  # MLflow's defaults stay allowed
    cmd = ui.server_command(f"sqlite:///{tmp_path / 'm.db'}", "0.0.0.0", 5001, allowed_hosts="mlflow.internal",
                            cors_allowed_origins="https://nb.internal", x_frame_options="DENY")
    assert cmd[cmd.index("--allowed-hosts") + 1].startswith("mlflow.internal,mlflow.internal:5001,localhost,")
    assert cmd[cmd.index("--cors-allowed-origins") + 1] == "https://nb.internal"
    assert cmd[cmd.index("--x-frame-options") + 1] == "DENY" and "--disable-security-middleware" not in cmd


@pytest.mark.slow
def test_rdml_ui_for_a_cluster_allowed_hosts_busy_port_and_ctrl_c(tmp_path):
    """A real `rdml ui --host 0.0.0.0 --allowed-hosts ...`: remote-style requests, the 403 pre-check, stop.

    The "remote" client is this machine addressing the server by a name it was not told to allow:
    127.0.0.2 (loopback, but not one of MLflow's default allowed hosts), which is what a client on
    another machine using the head's public name or IP looks like to the server.
    """
    import http.client
    import os
    import signal
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(_cfg(uri))
    end_run(run_id)
    port = _free_port()
    cmd = [sys.executable, "-c", _UI_MAIN, "--set", f"tracking.uri={uri}", "--port", str(port)]
    out, err_file = tmp_path / "ui.out", tmp_path / "ui.err"
    with open(out, "w") as o, open(err_file, "w") as e:  # files, not pipes: the server's logs must never block it
        proc = subprocess.Popen([*cmd, "--host", "0.0.0.0", "--allowed-hosts", "mlflow.example.org"], stdout=o, stderr=e)
    try:
        _wait_for_text(proc, out, f"127.0.0.1:{port}", err_file, timeout=180)
        # a request addressed to an allowed name is answered, on the API (not only /health)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", f"/api/2.0/mlflow/runs/get?run_id={run_id}", headers={"Host": f"mlflow.example.org:{port}"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["run"]["info"]["run_id"] == run_id
        assert _client(f"http://127.0.0.1:{port}").get_run(run_id).data.params["train.epochs"] == "3"
        # a name the server does not allow: /health still says 200, the pre-check reports the 403 and the fix
        with pytest.raises(TrackingError) as err:
            start_run(_cfg(f"http://127.0.0.2:{port}"))
        msg = str(err.value)
        assert "403" in msg and "--allowed-hosts 127.0.0.2" in msg and "Invalid Host header" in msg
        # the port is taken: a second `rdml ui` says so at once (mlflow server itself exits 0 after ~40 s)
        busy = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert busy.returncode == 2 and "already in use" in busy.stderr and "Traceback" not in busy.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        err_text = err_file.read_text()
        assert "Traceback" not in err_text and "stopped the MLflow server" in err_text
        with pytest.raises(OSError):  # the server's whole process group is gone
            http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/health")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_text(proc, path: Path, text: str, err_path: Path, timeout: float) -> None:
    """Wait until the process wrote ``text`` to ``path`` (AssertionError with its stderr if it exits first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in path.read_text():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"no {text!r} in the output within {timeout} s (exit {proc.poll()}): "
                         f"{path.read_text()[-1000:]} {err_path.read_text()[-3000:]}")


# `rdml ui` exactly as the CLI runs it (kept independent of the other sub-commands' imports)
_UI_MAIN = (
    "import argparse, sys; from rdml.commands import ui; from rdml.errors import RdmlError; "
    "p = argparse.ArgumentParser(prog='rdml ui'); ui.add_arguments(p); a = p.parse_args(sys.argv[1:])\n"
    "try: sys.exit(ui.run(a))\n"
    "except RdmlError as e: print(f'rdml ui: error: {e}', file=sys.stderr); sys.exit(2)"
)
