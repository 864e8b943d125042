"""rdml.tracking against a real MLflow server process and a real sqlite store."""

from __future__ import annotations

import json
import pickle
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from rdml.config import build_config
from rdml.errors import TrackingError
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
    make_logger,
    metric_key,
    resolve_uri,
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


def test_full_run_round_trip_through_server(mlflow_server, tmp_path):
    cfg = _cfg(mlflow_server)
    run_id = start_run(cfg, tags={"purpose": "test"})
    c = _client(mlflow_server)
    run = c.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["defense.pgd.steps"] == "8"
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
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    model_uri = log_model(run_id, model)

    names = set(list_artifacts(run_id)) | set(list_artifacts(run_id, "plots")) | set(list_artifacts(run_id, "checkpoints"))
    assert {"config.yaml", "plots/loss.png", "plots/recall_nmi.png", "plots/embedding_pca.png", "plots/custom.png",
            "checkpoints/last.pt"} <= names
    assert "train:\n  epochs: 3" in download_artifact(run_id, "config.yaml").read_text()
    assert json.loads(download_artifact(run_id, "extra/info.json").read_text()) == {"a": 1, "b": [1, 2]}
    assert download_artifact(run_id, "plots/embedding_pca.png").read_bytes()[:4] == b"\x89PNG"

    loaded = load_logged_model(model_uri, run_id)
    x = torch.randn(2, 4)
    assert torch.allclose(loaded(x), model(x))

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
        import os
        from types import SimpleNamespace

        os.chdir("/")  # a worker's CWD differs: the logger must not depend on it
        for epoch in range(2):
            lg.on_epoch_end(epoch, {"eval/recall@1": 0.1 * (epoch + 1)})
        lg.on_train_end(SimpleNamespace(metrics={}, checkpoint=None, history=[]))
        return True

    assert ray_local.get(train_in_worker.remote(logger), timeout=120)
    end_run(run_id)
    hist = _client(mlflow_uri).get_metric_history(run_id, "eval/recall_at_1")
    assert [round(m.value, 2) for m in hist] == [0.1, 0.2]
    assert "plots/loss.png" in list_artifacts(run_id, "plots")


@pytest.mark.slow
def test_rdml_ui_serves_the_configured_store(tmp_path):
    """`rdml ui` starts a real server on the sqlite store; a run logged there is visible through it."""
    import subprocess
    import sys
    import urllib.request

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(_cfg(uri))
    end_run(run_id)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", _UI_MAIN, "--set", f"tracking.uri={uri}", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        assert _client(f"http://127.0.0.1:{port}").get_run(run_id).data.params["train.epochs"] == "3"
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# `rdml ui` exactly as the CLI runs it (kept independent of the other sub-commands' imports)
_UI_MAIN = (
    "import argparse, sys; from rdml.commands import ui; p = argparse.ArgumentParser(prog='rdml ui'); "
    "ui.add_arguments(p); sys.exit(ui.run(p.parse_args(sys.argv[1:])))"
)
