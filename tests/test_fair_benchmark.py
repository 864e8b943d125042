"""The fair 28x28 benchmark's pieces: mnist5k, the training attack's reach, intervals, controls, the adaptive
profile, and the benchmark command's job machinery (resumable parts, MLflow parent/child runs, the doc)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rdml.attacks.ers import ers
from rdml.attacks.pgd import Budget
from rdml.attacks.profiles import ERS_KEYS, load_profile
from rdml.config import PGDConfig, build_config
from rdml.errors import ConfigError
from rdml.eval.controls import SHRINK_SCALE, ShrunkModel, untrained_model
from rdml.eval.intervals import bootstrap, combine_seeds, t_interval
from rdml.eval.robustness import evaluate_robustness
from rdml.metrics import lookup

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ mnist5k


def test_mnist5k_split_sizes_class_balance_and_determinism():
    from rdml.data import build_datasets

    splits = build_datasets(build_config({"data": {"name": "mnist5k"}}).data)
    assert (len(splits.train), len(splits.test)) == (4000, 1000)
    assert np.bincount(splits.train.class_ids).tolist() == [400] * 10
    assert np.bincount(splits.test.class_ids).tolist() == [100] * 10
    x, y, i = splits.train[0]
    assert x.shape == (1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.5
    again = build_datasets(build_config({"data": {"name": "mnist5k"}}).data)  # a fixed split, run after run
    assert torch.equal(splits.test[17][0], again.test[17][0]) and (splits.test.labels == again.test.labels).all()
    train_imgs = {splits.train[k][0].numpy().tobytes() for k in range(0, 4000, 7)}
    assert not any(splits.test[k][0].numpy().tobytes() in train_imgs for k in range(1000))  # disjoint images
    zs = build_datasets(build_config({"data": {"name": "mnist5k", "split": "zero_shot"}}).data)
    assert (len(zs.train), len(zs.test)) == (2500, 2500)
    assert set(zs.train.class_ids.tolist()) == {0, 1, 2, 3, 4} and set(zs.test.class_ids.tolist()) == {5, 6, 7, 8, 9}


def test_split_option_refused_where_the_protocol_is_fixed(tmp_path):
    from rdml.data import build_datasets
    from rdml.errors import DataError

    with pytest.raises(DataError, match="data.split=zero_shot is not available for dataset 'cub'"):
        build_datasets(build_config({"data": {"name": "cub", "split": "zero_shot", "root": str(tmp_path)}}).data)


# --------------------------------------------------------------------------- training attack's reach


def test_reach_check_refuses_a_training_attack_that_cannot_reach_its_eps():
    with pytest.raises(ConfigError, match=r"cannot reach its eps.*24.0/255 < 77.0/255.*steps >= 26"):
        build_config({"defense": {"name": "act", "pgd": {"eps": "77/255", "alpha": "3/255", "steps": 8}}})
    ok = build_config({"defense": {"name": "act", "pgd": {"eps": "77/255", "alpha": "3/255", "steps": 32}}})
    assert ok.defense.pgd.steps * ok.defense.pgd.step_size >= ok.defense.pgd.eps
    assert PGDConfig().steps * PGDConfig().step_size >= PGDConfig().eps  # the default reaches its ball
    auto = PGDConfig(eps=8 / 255, alpha="auto", steps=4)
    assert auto.step_size == pytest.approx(2.5 * 8 / 255 / 4)
    assert PGDConfig(eps=0.3, alpha=0.001, steps=1).step_size == 0.3  # one step is FGSM of size eps
    ablation = PGDConfig(eps=0.3, alpha=0.01, steps=8, partial_reach=True)  # allowed, explicitly
    assert Budget.from_config(ablation).alpha == 0.01
    with pytest.raises(ConfigError, match="larger than the whole L-inf pixel range"):
        build_config({"defense": {"pgd": {"eps": 5}}})


# ----------------------------------------------------------------------------------------- intervals


def test_bootstrap_interval_of_a_mean_has_the_known_normal_width():
    rng = np.random.default_rng(0)
    p, n = 0.3, 4000
    x = (rng.random(n) < p).astype(float)
    iv = bootstrap({"hit": x}, n_boot=2000, seed=1)["hit"]
    half = 1.96 * math.sqrt(p * (1 - p) / n)  # the normal approximation of a proportion's 95% interval
    assert iv.value == pytest.approx(x.mean())
    assert iv.low < p < iv.high
    assert (iv.high - iv.low) / 2 == pytest.approx(half, rel=0.15)


def test_derived_ers_interval_and_two_level_seed_interval():
    rng = np.random.default_rng(3)
    values = {"CA+": 0.02, "CA-": 0.9, "QA+": 0.01, "QA-": 0.9, "TMA": 0.9, "ES:D": 1.5, "ES:R": 0.1, "LTM": 0.05,
              "GTM": 0.2, "GTT": 0.0}
    per_query = {k: np.clip(v + 0.05 * rng.standard_normal(500), 0, 2) for k, v in values.items()}
    out = bootstrap(per_query, {"ers": ers}, n_boot=500, seed=0)
    assert out["ers"].value == pytest.approx(ers({k: float(np.mean(v)) for k, v in per_query.items()}))
    assert out["ers"].low < out["ers"].value < out["ers"].high
    # identical seeds: the two-level interval is the query-level one; spread-out seeds widen it
    same = combine_seeds([per_query, per_query, per_query], {"ers": ers}, n_boot=500, seed=0)
    shifted = [{k: v + d for k, v in per_query.items()} for d in (-0.05, 0.0, 0.05)]
    spread = combine_seeds(shifted, {"ers": ers}, n_boot=500, seed=0)
    assert same["ers"].value == pytest.approx(out["ers"].value)
    assert (spread["ers"].high - spread["ers"].low) > 1.5 * (same["ers"].high - same["ers"].low)
    t = t_interval([1.0, 2.0, 3.0])
    assert t.value == 2.0 and t.low == pytest.approx(2 - 4.3027 / math.sqrt(3), rel=1e-4)


# ------------------------------------------------------------------------------------------ controls


@pytest.mark.usefixtures("one_thread")
def test_shrink_control_changes_ers_but_not_the_ranking(trained_tiny, digits_splits):
    profile = load_profile("quick")
    kw = dict(max_queries=48, batch_size=48, progress=False)
    base = evaluate_robustness(trained_tiny, digits_splits.test, profile, **kw)
    scale = 0.1  # keeps this small model's spread above the collapse flag's threshold, as 0.05 does for C2F2
    shrunk = evaluate_robustness(ShrunkModel(trained_tiny, scale), digits_splits.test, profile, **kw)
    assert shrunk.benign_recall_at_1 == base.benign_recall_at_1  # the same ranking
    for k in ("CA+", "CA-", "QA+", "QA-", "TMA", "LTM", "GTM", "GTT"):  # scale-free attacks: the same outcome
        assert shrunk[f"attacks.{k}"] == pytest.approx(base[f"attacks.{k}"], abs=0.03), k
    assert shrunk["attacks.ES:D"] == pytest.approx(scale * base["attacks.ES:D"], rel=0.1)
    assert 0 < SHRINK_SCALE < 1
    assert shrunk["ers"] > base["ers"] + 3  # ERS rewards the shrinking ...
    assert shrunk["attacks.ES:D/spread"] == pytest.approx(base["attacks.ES:D/spread"], rel=0.1)  # ... the ratio does not
    assert shrunk["collapse"] == 0.0  # and the spread rule of the collapse flag does not catch it


def test_untrained_control_is_the_initial_model_of_fit(tmp_path):
    from rdml.data import build_datasets
    from rdml.models import build_model
    from rdml.train.seeding import derive_seed, seed_everything

    cfg = build_config({"data": {"name": "mnist5k"}, "train": {"seed": 3}})
    seed_everything(derive_seed(3))  # what fit does before building the model
    build_datasets(cfg.data)
    reference = build_model(cfg.model, 1, 28)
    model = untrained_model(cfg, 1, 28)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                 strict=True))
    other = untrained_model(build_config({"data": {"name": "mnist5k"}, "train": {"seed": 4}}), 1, 28)
    assert not torch.equal(next(iter(other.state_dict().values())), next(iter(model.state_dict().values())))


# ------------------------------------------------------------------------------------ adaptive profile


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_adaptive_profile_is_stronger_than_rob28_on_a_fixed_model(trained_tiny, digits_splits):
    kw = dict(max_queries=32, batch_size=32, progress=False)
    rob = evaluate_robustness(trained_tiny, digits_splits.test, "rob28", **kw)
    adaptive = evaluate_robustness(trained_tiny, digits_splits.test, "rob28-adaptive", **kw)
    assert np.array_equal(rob.indices, adaptive.indices)  # the same queries
    for k in ERS_KEYS:  # lower or equal robust metrics: never better for the defender (beyond the unit's tolerance)
        spec = lookup(f"attacks.{k}")
        assert spec.better(adaptive[f"attacks.{k}"], rob[f"attacks.{k}"]) <= spec.tolerance, k
    assert adaptive["ers"] <= rob["ers"] + 0.5
    assert adaptive["ers.2eps"] <= adaptive["ers"] + 0.5  # twice the budget is not weaker either
    prof = load_profile("rob28-adaptive")
    assert {s.steps for _, s in prof.keyed() if not _.startswith("2eps/")} == {128}
    assert {s.restarts for _, s in prof.keyed() if not _.startswith("2eps/")} == {5}


# ------------------------------------------------------------------------------ the benchmark command


@pytest.mark.slow
def test_benchmark_command_runs_in_resumable_parts_and_writes_the_doc(tmp_path):
    """The machinery end to end on a tiny budget: two models, one seed, controls, every job kind."""
    out, doc = tmp_path / "r28", tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "bench" / "robust28.py"), "--out", str(out), "--doc", str(doc),
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--models", "vanilla", "hm", "--seeds", "1",
           "--threads", "1", "--max-queries", "6", "--boot", "50", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2",
           "--set", "defense.pgd.steps=4", "--set", "defense.pgd.alpha=auto", "--set", "data.batch_pairs=16"]
    first = subprocess.run([*cmd, "--only", "train"], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "0 job(s) of this selection left" in first.stdout and not doc.exists()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "benchmark complete" in second.stdout and "train:vanilla:s0 ..." not in second.stdout  # reused
    state = json.loads((out / "state.json").read_text())
    assert {p["selection"] for p in state["parts"]} == {"train", "all"}  # two parts, each with its wall time
    assert all(p["minutes"] >= 0 for p in state["parts"])
    assert {"vanilla-s0", "hm-s0", "untrained-s0", "shrunk-s0"} <= set(state["runs"])
    text = doc.read_text()
    for needle in ("HM[S,gLGA]", "untrained (control)", "vanilla shrunk", "ES:D/spread", "### Checks", "Parts (wall time",
                   state["parent_run_id"], state["runs"]["hm-s0"]["run_id"]):
        assert needle in text, needle
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = client.search_runs([client.get_run(state["parent_run_id"]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")
    assert {r.info.run_name for r in children} == {"vanilla-s0", "hm-s0", "untrained-s0", "shrunk-s0"}
    assert all("ers" in r.data.metrics for r in children)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # finished jobs are reused
    assert again.returncode == 0 and " ... " not in again.stdout and "benchmark complete" in again.stdout


def test_seed_intervals_of_a_fraction_stay_in_its_range():
    """Two seeds give a wide t-interval; NMI's is clipped to [0, 1], a distance's is not clipped."""
    from rdml.eval.compare import RunEvaluation, combine

    runs = [RunEvaluation(f"r{s}", s, {"nmi": v, "attacks.ES:D": d}) for s, (v, d) in enumerate([(0.95, 0.3), (0.88, 0.5)])]
    out = combine(runs)
    assert out["nmi"].high == 1.0 and 0.0 <= out["nmi"].low < 0.88 and out["nmi"].value == pytest.approx(0.915)
    assert out["attacks.ES:D"].low < 0.0  # a distance's t-interval is left as computed
