"""The EAT evidence command (bench/eat_evidence.py): equal-passes budgets, and the machinery end to end on a tiny budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_every_mode_gets_the_same_passes_per_member_and_the_single_model_the_ensembles_total(tmp_path):
    from eat_evidence import nominal_passes, run_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfgs = {run: run_config(run, 0, tmp_path, uri, 3) for run in
            ("ens-none", "ens-cross_member", "ens-ensemble_gradient", "single")}
    totals = {run: c.train.epochs * c.ensemble.steps_per_epoch * nominal_passes(c) for run, c in cfgs.items()}
    none = cfgs["ens-none"]
    assert none.defense.name == "minmax" and none.defense.pgd.eps == pytest.approx(77 / 255)
    assert none.defense.pgd.steps * none.defense.pgd.step_size >= none.defense.pgd.eps  # full reach
    for run in ("ens-cross_member", "ens-ensemble_gradient"):
        assert abs(totals[run] - totals["ens-none"]) <= 0.02 * totals["ens-none"], (run, totals)
    assert totals["single"] == pytest.approx(3 * totals["ens-none"], rel=0.02)
    single = cfgs["single"]
    assert (single.ensemble.members, single.ensemble.parts, single.ensemble.self_transfer) == (1, 1, "none")
    assert cfgs["ens-ensemble_gradient"].ensemble.self_transfer == "ensemble_gradient"
    assert nominal_passes(cfgs["ens-ensemble_gradient"]) == 3 * 8 + 1 and nominal_passes(none) == 8 + 1


@pytest.mark.slow
def test_evidence_command_runs_in_resumable_parts_and_writes_the_doc(tmp_path):
    """Two modes, two members, one seed, every job kind, on a tiny budget; then the doc and the MLflow runs."""
    out, doc = tmp_path / "ev", tmp_path / "results-eat.md"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, str(ROOT / "bench" / "eat_evidence.py"), "--out", str(out), "--doc", str(doc),
           "--tracking-uri", uri, "--seeds", "1", "--members", "2", "--modes", "none", "ensemble_gradient",
           "--threads", "1", "--max-queries", "6", "--attack-steps", "2", "--boot", "20", "--set", "data.limit_train=160",
           "--set", "data.limit_test=100", "--set", "data.batch_pairs=8", "--set", "defense.pgd.steps=2",
           "--set", "train.epochs=1"]
    first = subprocess.run([*cmd, "--only", "train"], capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "0 job(s) of this selection left" in first.stdout and not doc.exists()
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    trained = json.loads((out / "state.json").read_text())
    assert client.get_run(trained["runs"]["ens-none-s0"]["run_id"]).info.status == "RUNNING"  # its evals are left
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=2400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "evidence complete" in second.stdout and "train:ens-none:s0 ..." not in second.stdout  # reused
    state = json.loads((out / "state.json").read_text())
    assert {p["selection"] for p in state["parts"]} == {"train", "all"}
    assert set(state["runs"]) == {"ens-none-s0", "ens-ensemble_gradient-s0", "single-s0"}
    done = state["done"]
    none, grad = done["train:ens-none:s0"]["passes_per_member"], done["train:ens-ensemble_gradient:s0"]["passes_per_member"]
    # equal passes per member, measured, up to rounding the schedule to whole steps: one none step costs
    # 2 PGD iterations + 1 update, one ensemble_gradient step 2 x 2 + 1, one single-model step 2 + 1
    assert abs(none - grad) < 2 * 2 + 1, (none, grad)
    assert abs(done["train:single:s0"]["passes_per_member"] - 2 * none) < 2 + 1  # the ensemble's total compute
    assert {"eval:ens-none:ensemble:s0", "eval:ens-none:member_1:s0", "eval:single:single:s0",
            "guard:ens-ensemble_gradient:s0"} <= set(done)
    text = doc.read_text()
    for needle in ("Smoke run of the machinery", "(a) The ensemble against its best member",
                   "(b) Each self-transfer mode against `none`", "(c) The ensemble against one model",
                   "Gradient-masking guard", "Default `ensemble.self_transfer`", state["parent_run_id"],
                   state["runs"]["ens-ensemble_gradient-s0"]["run_id"], "Parts (wall time"):
        assert needle in text, needle
    children = client.search_runs([client.get_run(state["parent_run_id"]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")
    assert {r.info.run_name for r in children} == {"ens-none-s0", "ens-ensemble_gradient-s0", "single-s0"}
    assert {r.info.status for r in children} == {"FINISHED"}  # every job done: no run left RUNNING
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    ens = next(r for r in children if r.info.run_name == "ens-none-s0").data.metrics
    assert "ensemble/rob28/ers" in ens and "member_0/clustering28/clustering.centroid_class_dynamic.nmi" in ens
    assert "guard/holds" in ens and "train/loss" in ens
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # finished jobs are reused
    assert again.returncode == 0 and " ... " not in again.stdout and "evidence complete" in again.stdout


def test_parts_claim_jobs_and_a_dead_parts_claim_is_stale(tmp_path):
    """Several parts run the same command at once: a job a live part holds is skipped, a dead part's is retaken."""
    from eat_evidence import Job, State

    state = State(tmp_path / "state.json")
    job = Job("train", "ens-none", 0)
    assert state.claim(job) and not state.claimed_by_other(job)  # ours
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid, live in ((os.getppid(), True), (dead.pid, False)):
        state.update(lambda d, pid=pid: d["claims"].__setitem__(job.key, {"pid": pid, "since": "t"}))
        state.reload()
        assert state.claimed_by_other(job) is live
        assert state.claim(job) is not live
    state.finish(job, 1.0)  # done and unclaimed in one change
    state.reload()
    assert job.key not in state.data["claims"] and not state.claim(job)


def test_the_default_mode_needs_a_separated_ers_and_a_tie_inside_the_noise_goes_to_the_clustering_threat():
    """The report's default self-transfer: never a mode inside `none`'s noise, never picked on a noise-sized gap."""
    from eat_evidence_report import ModeEvidence, choose_default

    from rdml.eval.intervals import Interval

    above, level = Interval(16.0, 12.0, 20.0), Interval(1.0, -3.0, 5.0)

    def gap(sep: bool):
        return lambda a, b: Interval(4.0, 1.0, 7.0) if sep else Interval(0.5, -6.0, 5.0)

    inside = {"cross_member": ModeEvidence(20.0, level, above, level),
              "ensemble_gradient": ModeEvidence(21.0, Interval(3.0, -0.5, 6.5), above, level)}
    assert choose_default(inside, gap(True)) == ("none", [])  # no ERS interval excludes 0
    both = {"cross_member": ModeEvidence(34.1, above, Interval(16.0, 0.3, 32.0), level),
            "ensemble_gradient": ModeEvidence(34.6, above, level, Interval(-1.6, -2.6, -0.5))}
    pick, tied = choose_default(both, gap(False))  # a 0.5-point ERS gap inside the noise is a tie ...
    assert pick == "cross_member" and sorted(tied) == ["cross_member", "ensemble_gradient"]  # ... NMI decides
    assert choose_default(both, gap(True)) == ("ensemble_gradient", ["ensemble_gradient"])  # a separated lead wins
    no_nmi = {m: ModeEvidence(e.ers_mean, e.vs_none_ers, level, e.vs_none_r1) for m, e in both.items()}
    assert choose_default(no_nmi, gap(False))[0] == "cross_member"  # then the R@1 cost decides
