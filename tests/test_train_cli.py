"""`rdml train`: in-process (--no-ray), user errors before Ray starts, and Ray Train DDP with 2 workers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rdml.cli import main
from rdml.tracking import metric_key
from rdml.train import load_checkpoint

RDML = str(Path(sys.executable).parent / "rdml")


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "train", "--config", "digits", "--epochs", "1",
        "--set", "train.max_steps_per_epoch=5", "--set", "data.batch_pairs=16", "--set", "model.embedding_dim=32",
        "--set", f"train.output_dir={tmp_path / 'runs'}", "--set", "tracking.log_model=false",
        "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--set", "tracking.run_name=t",
        *extra,
    ]


def finished_run(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "rdml"]
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


def test_no_ray_trains_logs_and_prints_table(tmp_path, capsys):
    assert main(tiny_args(tmp_path, "--no-ray")) == 0
    out = capsys.readouterr().out
    assert "recall@1" in out and "final metrics" in out and "checkpoint:" in out
    ckpt = load_checkpoint(tmp_path / "runs" / "t")
    assert ckpt.epoch == 1 and ckpt.config.train.max_steps_per_epoch == 5
    client, run = finished_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.metrics[metric_key("eval/recall@1")] == pytest.approx(ckpt.metrics["eval/recall@1"])
    assert "train/loss" in run.data.metrics and run.data.params["train.epochs"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "checkpoints" in artifacts

    # --resume with no --config takes the checkpoint's own config; --epochs extends the run
    assert main(["train", "--no-ray", "--resume", str(tmp_path / "runs" / "t"), "--epochs", "2"]) == 0
    assert load_checkpoint(tmp_path / "runs" / "t").epoch == 2


def test_user_errors_fail_fast_before_ray(tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(tiny_args(tmp_path, "--set", "train.lr=-1")) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(tiny_args(tmp_path, "--set", "data.name=cub", "--set", f"data.root={tmp_path / 'no-cub'}")) == 2
    assert "cub" in capsys.readouterr().err.lower()
    assert main(tiny_args(tmp_path, "--set", "tracking.uri=http://127.0.0.1:9")) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err
    assert main(tiny_args(tmp_path, "--resume", str(tmp_path / "missing"))) == 2
    assert "does not exist" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 20  # nothing above started Ray or trained


@pytest.mark.slow
def test_cli_two_ddp_workers_on_ray(tmp_path):
    """The real CLI: a local Ray, Ray Train with 2 CPU workers (DDP over gloo), MLflow in sqlite."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [RDML, *tiny_args(tmp_path, "--workers", "2")], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "recall@1" in proc.stdout
    ckpt = load_checkpoint(tmp_path / "runs" / "t")
    assert ckpt.epoch == 1 and ckpt.config.train.workers == 2
    assert 0.2 < ckpt.metrics["eval/recall@1"] <= 1.0
    _, run = finished_run(tmp_path)
    assert run.info.status == "FINISHED" and metric_key("eval/recall@1") in run.data.metrics
