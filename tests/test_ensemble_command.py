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

    from rdml.tracking import load_logged_model, logged_models, metric_key

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
    from rdml.attacks.ers import ers

    ens = report["robustness"]["ensemble"]  # ERS is a mean of ten uncapped terms: not bounded by 100
    assert ens["ers"] == pytest.approx(ers(ens)) and ens["ci.ers.low"] <= ens["ers"] <= ens["ci.ers.high"]
    run = MlflowClient(mlflow_uri).search_runs([MlflowClient(mlflow_uri).get_experiment_by_name("rdml").experiment_id])[0]
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    expected = {"member_0/recall@1", "member_1/recall@1", "ensemble/recall@1", "train/loss", "ensemble/robust/ers"}
    assert {metric_key(k) for k in expected} <= set(metrics)
    assert run.data.params["ensemble.members"] == "2"
    # the final checkpoint (a run directory --resume accepts) and the combined model are artifacts of the run
    client = MlflowClient(mlflow_uri)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    logged = {f.path for d in ("checkpoints", f"checkpoints/step-{manifest['step']:06d}")
              for f in client.list_artifacts(run.info.run_id, d)}
    assert {"checkpoints/manifest.json", *(f"checkpoints/{f}" for f in manifest["files"])} <= logged
    models = logged_models(run.info.run_id, mlflow_uri)
    assert [(m.name, m.experiment_id) for m in models] == [("model", run.info.experiment_id)]
    assert len(load_logged_model(f"models:/{models[0].model_id}", tracking=mlflow_uri).members) == 2


def test_resume_requires_a_manifest(tmp_path):
    from rdml.errors import ConfigError

    with pytest.raises(ConfigError, match="no ensemble checkpoint"):
        command.build_ensemble_config(_args("--resume", str(tmp_path)))


def test_members_must_be_at_least_one(tmp_path, capsys):
    """`--members 0` used to be ignored (3 members trained); it is refused like ensemble.members=0."""
    from rdml.cli import main
    from rdml.errors import ConfigError

    with pytest.raises(ConfigError, match="ensemble.members"):
        command.build_ensemble_config(_args("--config", "digits-eat", "--members", "0"))
    assert command.build_ensemble_config(_args("--config", "digits-eat", "--members", "1"))[0].ensemble.members == 1
    assert main(["ensemble", "--config", "digits-eat", "--members", "-2"]) == 2
    assert "ensemble.members" in capsys.readouterr().err


def test_resume_keeps_the_number_of_members(tmp_path):
    from rdml.config import load_config
    from rdml.ensemble.checkpoint import save_ensemble_checkpoint
    from rdml.errors import ConfigError

    cfg = load_config("digits-eat", ["ensemble.members=2", "ensemble.parts=2"])
    save_ensemble_checkpoint(tmp_path, 0, [{"member": 0}, {"member": 1}], cfg)
    assert command.build_ensemble_config(_args("--resume", str(tmp_path)))[0].ensemble.members == 2
    with pytest.raises(ConfigError, match="holds 2 members"):
        command.build_ensemble_config(_args("--resume", str(tmp_path), "--members", "3"))


def test_should_stop_checkpoints_the_last_finished_step(tmp_path):
    """The trainer's stop request (SIGINT/SIGTERM in the command) saves the step just finished, then raises."""
    import torch
    from test_ensemble import eat_config

    from rdml.data import build_datasets
    from rdml.ensemble import LocalEnsemble, load_manifest, train_ensemble
    from rdml.ensemble.trainer import EnsembleInterrupted

    torch.set_num_threads(1)
    cfg = eat_config(tmp_path, train={"epochs": 2, "checkpoint_every": 1}, steps_per_epoch=4, self_transfer="none")
    splits = build_datasets(cfg.data)
    steps: list[int] = []
    with pytest.raises(EnsembleInterrupted) as stop:
        train_ensemble(cfg, LocalEnsemble(cfg, splits.train), splits, tmp_path / "run",
                       log=lambda m, step: steps.append(step), should_stop=lambda: len(steps) >= 3)
    assert (stop.value.step, stop.value.total) == (3, 8)
    assert load_manifest(tmp_path / "run").step == 3  # not the periodic one (0 or 4): the step that finished
    resumed = train_ensemble(cfg, LocalEnsemble(cfg, splits.train), splits, tmp_path / "run",
                             resume=tmp_path / "run")
    assert resumed.steps == 8 and [h["step"] for h in resumed.history] == [4, 5, 6, 7, 8]


_SIGNAL_RUN = ["--config", "digits-eat", "--members", "2", "--no-attacks", "--set", "ensemble.parts=2",
               "--set", "ensemble.steps_per_epoch=40", "--set", "train.epochs=1", "--set", "data.batch_pairs=8",
               "--set", "defense.pgd.steps=1", "--set", "ensemble.cpus_per_member=0.5", "--set", "train.threads=1"]


def _interrupt(tmp_path, mlflow_uri, sig, *extra: str) -> tuple[int, str, str, int]:
    """Run `rdml ensemble` in a subprocess, send ``sig`` once a few steps are logged; (exit, stderr, run id, step)."""
    import os
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / f"run-{sig.name}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "TQDM_DISABLE": "1"}
    env.pop("RAY_ADDRESS", None)
    err = tmp_path / f"{sig.name}.err"
    with open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "rdml.cli", "ensemble", *_SIGNAL_RUN, *extra, "--run-dir",
                                 str(run_dir)], env=env, stdout=subprocess.DEVNULL, stderr=e)
    client, seen = MlflowClient(mlflow_uri), 0
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and seen < 3:
            time.sleep(0.3)
            exp = client.get_experiment_by_name("rdml")
            runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'") if exp else []
            if runs:
                run_id = runs[0].info.run_id
                seen = max((m.step for m in client.get_metric_history(run_id, "train/loss")), default=0)
        assert seen >= 3, err.read_text()[-3000:]
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, err.read_text(), run_id, seen


@pytest.mark.slow
def test_sigterm_on_ray_and_sigint_stop_cleanly_and_resume_the_same_run(tmp_path, mlflow_uri):
    """SIGTERM (Ray path) and SIGINT (in-process): checkpoint of the last step, KILLED run, one line, 143/130."""
    import signal

    from mlflow.tracking import MlflowClient

    from rdml.ensemble import load_manifest

    client = MlflowClient(mlflow_uri)
    for sig, extra, code in ((signal.SIGTERM, (), 143), (signal.SIGINT, ("--no-ray",), 130)):
        exit_code, stderr, run_id, seen = _interrupt(tmp_path, mlflow_uri, sig, *extra)
        run_dir = tmp_path / f"run-{sig.name}"
        step = load_manifest(run_dir).step
        lines = [ln for ln in stderr.splitlines() if "resume with" in ln]
        assert exit_code == code, stderr[-3000:]
        assert lines == [f"rdml ensemble: stopped by {sig.name}; checkpoint at step {step}/40 in {run_dir}; "
                         f"resume with: rdml ensemble --resume {run_dir}"]
        assert seen <= step < 40  # the step that had finished when the signal came, not a periodic checkpoint
        assert "Traceback" not in stderr and "core_worker" not in stderr and "*** SIG" not in stderr
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert "checkpoints/manifest.json" in {f.path for f in client.list_artifacts(run_id, "checkpoints")}

    # --resume continues the same MLflow run (here in this process, without Ray: the states are the same)
    run_dir = tmp_path / "run-SIGTERM"
    assert command.run(_args("--resume", str(run_dir), "--no-ray", "--no-attacks")) == 0
    run = client.get_run(run_id_of(run_dir))
    assert run.info.status == "FINISHED" and run.data.tags["rdml.resumes"] == "1"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")} == set(range(1, 41))
    assert load_manifest(run_dir).step == 40


def run_id_of(run_dir) -> str:
    from rdml.ensemble import load_manifest

    return load_manifest(run_dir).mlflow_run_id


def test_members_that_the_cluster_can_never_host_are_refused_at_once(ray_local):
    """No autoscaler (a fixed cluster): more than the nodes have fails now, not after the 120 s placement wait."""
    import time

    from rdml.distributed.eat import check_capacity
    from rdml.errors import ConfigError

    check_capacity({"CPU": 1.0}, 4)  # the session Ray has 4 logical CPUs and 3 GPUs
    check_capacity({"CPU": 1.0, "GPU": 1.0}, 3)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_capacity({"CPU": 1.0}, 5)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "CPU 5 (the cluster has 4)" in msg and "ensemble.cpus_per_member=0.8" in msg and "--members" in msg
    with pytest.raises(ConfigError, match="GPU 4 \\(the cluster has 3\\)"):
        check_capacity({"CPU": 0.5, "GPU": 1.0}, 4)
    with pytest.raises(ConfigError, match="CPU on one node 8"):
        check_capacity({"CPU": 8.0}, 1)
