"""Sharded attack evaluation (rdml.eval.shards): every per-query number equals the single-process one.

The single-process path is pinned bit for bit by tests/test_attack_regression.py; here the same
evaluations run cut into shards (an in-process executor that shards like a pool of workers, and real
Ray actors) and every per-query value, PGD iteration count, pass count, target, example and flat
metric must be identical: the ERS profile with a random-start attack, the adaptive profile (restarts,
a seeded query subset), the clustering attacks, queries searching a separate gallery, and a worst-case
suite with its black-box search and transfer attacks.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_attack_regression import Images, Net, _profiles, _robustness_arrays  # tests/ is on sys.path

from rdml.eval.shards import InProcess, plan_tasks


class ShardedHere(InProcess):
    """Cuts the work like a pool of ``workers`` would, but runs the shards here, in task order."""

    def __init__(self, workers: int) -> None:
        super().__init__("cpu")
        self.workers = workers
        self.tasks = 0

    def map(self, fn, plan, tasks):
        self.tasks = len(tasks)
        return super().map(fn, plan.to("cpu"), tasks)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        assert x.shape == y.shape, key
        if x.dtype.kind in "fc":
            np.testing.assert_array_equal(x, y, err_msg=key)  # NaN == NaN, bit for bit otherwise
        else:
            assert (x == y).all(), key


def _worst_profile():
    from rdml.attacks.profiles import load_profile

    worst = load_profile("worst28")
    attacks = tuple(s.model_copy(update={"steps": 3}) for s in worst.attacks[:3])
    settings = worst.worst_case.model_copy(update={
        "blackbox": worst.worst_case.blackbox.model_copy(update={"queries": 12}),
        "transfer": tuple(s.model_copy(update={"steps": 2}) for s in worst.worst_case.transfer[:2])})
    return worst.model_copy(update={"name": "worst-small", "attacks": attacks, "worst_case": settings})


def _worst_arrays(res) -> dict[str, np.ndarray]:
    out = _robustness_arrays("worst", res)
    for name, values in res.worst.per_query.items():
        out[f"worst/pq/{name}"] = values
    for key, member in res.worst.members.items():
        for m, values in member.items():
            out[f"worst/member/{key}/{m}"] = values
    return out


@pytest.fixture
def tiny(one_thread):
    return Net().eval(), Images()


def test_plan_cuts_whole_batches_and_replays_generators(tiny):
    """Shards start on batch boundaries; the replayed generator state of a later shard is the state a
    single run reaches there (checked by drawing from both)."""
    from rdml.attacks.ranking import Database
    from rdml.attacks.runner import attack_generators, embed_indices, run_ranking_attack
    from rdml.eval.robustness import _plan

    model, data = tiny
    main, _, _ = _profiles()
    emb = embed_indices(model, data, np.arange(len(data)), 16, "cpu")
    labels = data.labels.astype(np.int64)
    db = Database(emb, torch.as_tensor(labels))
    idx = np.arange(len(data))
    plan = _plan(main, model, data, db, idx, idx, labels, None, None, 10, 0, "cpu")
    tasks = plan_tasks(plan, 3)
    assert [(t.first_batch, t.batches) for t in tasks] == [(0, 2), (2, 1), (3, 2)]  # 5 batches of 10 (48 items)
    assert tasks[0].starts is None and set(tasks[1].starts) == {a.key for a in plan.attacks}
    for attack in plan.attacks:
        gens = attack_generators(0, attack.key)
        run_ranking_attack(model, data, idx[:20], attack, db, batch_size=10, progress=False, generators=gens)
        state = tasks[1].starts[attack.key]
        assert torch.equal(gens[0].get_state(), state[0]) and torch.equal(gens[1].get_state(), state[1]), attack.key


@pytest.mark.parametrize("workers", [2, 3])
def test_sharded_equals_single_process(tiny, workers):
    from rdml.eval.robustness import evaluate_robustness

    model, data = tiny
    main, adaptive, clustering = _profiles()
    cases = [(main, dict(batch_size=16, keep_examples=3, intervals=30)),
             (adaptive, dict(seed=1, batch_size=8, intervals=20)),
             (clustering, dict(batch_size=16))]
    for profile, kw in cases:
        one = evaluate_robustness(model, data, profile, progress=False, **kw)
        executor = ShardedHere(workers)
        many = evaluate_robustness(model, data, profile, progress=False, executor=executor, **kw)
        assert executor.tasks > 1, profile.name
        _same(_robustness_arrays(profile.name, one), _robustness_arrays(profile.name, many))


def test_sharded_gallery_and_worst_case_equal_single_process(tiny):
    """Queries outside the gallery (nothing masked) and a worst-case suite with its black-box search and
    transfer attacks crafted on a surrogate: the same per-item worst case, member by member."""
    from rdml.eval.robustness import evaluate_robustness

    model, data = tiny
    main, _, _ = _profiles()
    queries, gallery = torch.utils.data.Subset(data, range(20)), torch.utils.data.Subset(data, range(20, 48))
    queries.labels, gallery.labels = data.labels[:20], data.labels[20:]  # rdml's label lookup reads .labels
    for kw in (dict(gallery=gallery, batch_size=6), dict(batch_size=8)):
        one = evaluate_robustness(model, queries if "gallery" in kw else data, main, progress=False, **kw)
        many = evaluate_robustness(model, queries if "gallery" in kw else data, main, progress=False,
                                   executor=ShardedHere(2), **kw)
        _same(_robustness_arrays("g", one), _robustness_arrays("g", many))
    surrogate = Net()
    with torch.no_grad():
        for p in surrogate.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    worst = _worst_profile()
    one = evaluate_robustness(model, data, worst, batch_size=8, progress=False, intervals=20, surrogate=surrogate.eval())
    assert sorted(one.worst.members) == ["CA+", "CA-", "QA+", "blackbox", "transfer/ES", "transfer/LTM"]
    many = evaluate_robustness(model, data, worst, batch_size=8, progress=False, intervals=20,
                               surrogate=surrogate.eval(), executor=ShardedHere(3))
    _same(_worst_arrays(one), _worst_arrays(many))


def test_ray_attack_workers_equal_single_process(ray_local, tiny):
    """Two real Ray actors (one torch thread each): the same numbers as this process on one thread; a model
    whose code the workers cannot import is refused with the fix."""
    import ray.cloudpickle
    import test_attack_regression

    from rdml.distributed.attack_workers import RayAttackWorkers
    from rdml.errors import ConfigError
    from rdml.eval.robustness import evaluate_robustness

    model, data = tiny
    main, _, clustering = _profiles()
    with RayAttackWorkers(2, threads=1, gpus=False) as workers:
        with pytest.raises(ConfigError, match="importable on the workers"):  # tests/ is not on the workers' path
            evaluate_robustness(model, data, main, batch_size=8, progress=False, executor=workers)
        ray.cloudpickle.register_pickle_by_value(test_attack_regression)  # ...so send the model's code along
        assert [w["threads"] for w in workers.info] == [1, 1] and len({w["pid"] for w in workers.info}) == 2
        for profile in (main, clustering):
            one = evaluate_robustness(model, data, profile, batch_size=8, progress=False, keep_examples=2, intervals=20)
            many = evaluate_robustness(model, data, profile, batch_size=8, progress=False, keep_examples=2,
                                       intervals=20, executor=workers)
            _same(_robustness_arrays(profile.name, one), _robustness_arrays(profile.name, many))
    assert workers.actors == []


def test_ray_attack_workers_refuse_what_they_cannot_do(ray_local):
    from rdml.distributed.attack_workers import RayAttackWorkers
    from rdml.errors import ConfigError

    with pytest.raises(ConfigError, match="lower --workers"):
        RayAttackWorkers(64, threads=1, gpus=False)


def test_evaluate_options_of_workers_are_checked(tmp_path):
    """--threads/--address without --workers, and eval.workers with the in-process ensemble, are refused."""
    for argv, needle in ((["evaluate", "x.pt", "--threads", "2"], "go with --workers"),
                         (["ensemble", "--config", "digits-eat", "--no-ray", "--set", "eval.workers=2"],
                          "--no-ray runs without Ray")):
        proc = subprocess.run([sys.executable, "-m", "rdml.cli", *argv], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_tune_trials_reserve_their_attack_workers():
    from ray import tune

    from rdml.tune.search import trial_resources
    from rdml.tune.space import load_space

    space, _ = load_space("hm_schedules")
    assert trial_resources(space) == {"cpu": space.resources.cpu, "gpu": space.resources.gpu}
    sharded = space.model_copy(update={"robustness": space.robustness.model_copy(update={"workers": 2})})
    pgf = trial_resources(sharded)
    assert isinstance(pgf, tune.PlacementGroupFactory)
    assert pgf.bundles[1:] == [{"CPU": 1.0}, {"CPU": 1.0}]


@pytest.mark.slow
def test_rdml_evaluate_with_workers_writes_the_same_numbers(tmp_path, tiny_config):
    """The command end to end: a trained checkpoint, rob28 on 24 queries, in one process and on 2 Ray
    workers (1 thread each): identical JSON metrics."""
    from rdml.train.loop import fit

    fit(tiny_config, progress=False)
    ckpt = next(tmp_path.rglob("last.pt"))
    outs = {}
    for name, extra in (("one", []), ("two", ["--workers", "2"])):
        out = tmp_path / f"{name}.json"
        cmd = [sys.executable, "-m", "rdml.cli", "evaluate", str(ckpt), "--profile", "rob28", "--max-queries", "24",
               "--intervals", "50", "--quiet", "--json", str(out), *extra]
        env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outs[name] = json.loads(out.read_text())
    assert outs["one"].keys() == outs["two"].keys()
    for key, value in outs["one"].items():
        assert outs["two"][key] == value or (value != value and outs["two"][key] != outs["two"][key]), key


@pytest.mark.slow
def test_attack_scaling_bench_runs_and_finds_identical_numbers(tmp_path):
    """bench/attack_scaling.py on a tiny budget: the table, the JSON, every row identical."""
    from pathlib import Path

    out = tmp_path / "scaling.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "attack_scaling.py"
    proc = subprocess.run([sys.executable, str(bench), "--profile", "quick", "--max-queries", "8", "--batch-size", "4",
                           "--workers", "2", "--json", str(out)], capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["one process", "2 Ray workers"]
    assert all(r["identical"] and r["wall_s"] > 0 and 0 <= r["attack_s"] for r in rows)
    assert "speed-up" in proc.stdout


@pytest.mark.slow
def test_ensemble_final_evaluation_on_attack_workers(tmp_path):
    """rdml ensemble on Ray with eval.workers=2: the ensemble's robustness row equals the one-process
    evaluation of the saved combined model (quick profile, 16 queries, one thread everywhere)."""
    import os

    from rdml.data import build_datasets
    from rdml.ensemble.load import load_ensemble_model
    from rdml.eval.protocol import evaluation_sets
    from rdml.eval.robustness import evaluate_robustness

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "rdml.cli", "ensemble", "--config", "digits-eat", "--members", "2", "--run-dir",
           str(run), "--set", "ensemble.parts=2", "--set", "ensemble.steps_per_epoch=2", "--set", "train.epochs=1",
           "--set", "data.batch_pairs=8", "--set", "defense.pgd.steps=1", "--set", "eval.max_queries=16",
           "--set", "eval.profile=quick", "--set", "eval.workers=2", "--set", "tracking.enabled=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "attacking the ensemble on 2 attack workers" in proc.stdout
    row = json.loads((run / "ensemble_report.json").read_text())["robustness"]["ensemble"]
    model, cfg = load_ensemble_model(run)
    queries, gallery = evaluation_sets(build_datasets(cfg.data))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = evaluate_robustness(model.eval(), queries, "quick", seed=cfg.eval.attack_seed, max_queries=16,
                                   batch_size=cfg.data.eval_batch_size, progress=False, intervals=1000, gallery=gallery)
    finally:
        torch.set_num_threads(threads)
    assert row["ers"] == pytest.approx(float(here["ers"]), abs=0) and row["attacks.QA-"] == float(here["attacks.QA-"])
    assert {k: row[k] for k in here} == {k: float(v) for k, v in here.items()}
