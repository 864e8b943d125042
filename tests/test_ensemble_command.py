"""`rdml ensemble`: trains, evaluates members and ensemble under attack, logs to MLflow, prints a table."""

from __future__ import annotations

import argparse
import json

import pytest

from rdml.commands import ensemble as command


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.slow
def test_ensemble_command_in_process_logs_members_and_ensemble(tmp_path, mlflow_uri, capsys):
    from mlflow.tracking import MlflowClient

    from rdml.tracking import metric_key

    args = _args(
        "--config", "digits-eat", "--no-ray", "--members", "2", "--run-dir", str(tmp_path / "run"),
        "--set", "ensemble.parts=2", "--set", "ensemble.steps_per_epoch=2", "--set", "train.epochs=1",
        "--set", "data.batch_pairs=8", "--set", "defense.pgd.steps=1", "--set", "eval.max_queries=16",
        "--set", "eval.profile=quick", "--set", f"tracking.uri={mlflow_uri}",
    )
    assert command.run(args) == 0
    out = capsys.readouterr().out
    assert "member_0" in out and "member_1" in out and "ensemble" in out and "clean recall@1" in out
    report = json.loads((tmp_path / "run" / "ensemble_report.json").read_text())
    assert report["steps"] == 2 and set(report["robustness"]) == {"member_0", "member_1", "ensemble"}
    assert 0 <= report["robustness"]["ensemble"]["ers"] <= 100
    run = MlflowClient(mlflow_uri).search_runs([MlflowClient(mlflow_uri).get_experiment_by_name("rdml").experiment_id])[0]
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    expected = {"member_0/recall@1", "member_1/recall@1", "ensemble/recall@1", "train/loss", "ensemble/robust/ers"}
    assert {metric_key(k) for k in expected} <= set(metrics)
    assert run.data.params["ensemble.members"] == "2"


def test_resume_requires_a_manifest(tmp_path):
    from rdml.errors import ConfigError

    with pytest.raises(ConfigError, match="no ensemble checkpoint"):
        command.build_ensemble_config(_args("--resume", str(tmp_path)))
