"""A real Ray Tune search end to end: 4 HM-schedule trials on digits, ASHA, MLflow parent + children."""

from __future__ import annotations

import pytest

from rdml.config import load_config

pytestmark = pytest.mark.slow

TINY = [
    "train.epochs=2", "train.max_steps_per_epoch=2", "data.batch_pairs=8", "model.embedding_dim=16",
    "data.limit_test=100", "defense.pgd.steps=2",
]


def test_hm_schedule_search_gives_a_front_and_ended_child_runs(ray_local, tmp_path):
    from mlflow import MlflowClient

    from rdml.tune import load_space, run_search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space, _ = load_space("tune_spaces/hm_schedules.yaml")
    space = space.model_copy(update={
        "robustness": space.robustness.model_copy(update={"max_queries": 6}),
        "params": {k: v for k, v in space.params.items() if k != "defense.pgd.steps"},
    })
    result = run_search(space, overrides=[*TINY, f"tracking.uri={uri}", f"train.output_dir={tmp_path / 'runs'}"],
                        num_samples=4, storage_path=tmp_path / "tune")

    assert len(result.trials) == 4 and result.errors == 0
    assert all("recall@1" in t and "ers" in t for t in result.trials)
    # the front is exactly the trials no other trial beats on both R@1 and ERS
    def dominated(t):
        return any(o["recall@1"] >= t["recall@1"] and o["ers"] >= t["ers"]
                   and (o["recall@1"], o["ers"]) != (t["recall@1"], t["ers"]) for o in result.trials)
    expected = sorted((t["recall@1"], t["ers"]) for t in result.trials if not dominated(t))
    assert sorted((p["recall@1"], p["ers"]) for p in result.front) == expected
    best_r1 = max(t["recall@1"] for t in result.trials)
    assert any(p["recall@1"] == best_r1 for p in result.front)  # the R@1 winner is always on the front

    # every front member is a recipe `rdml train --config` accepts, with the trial's sampled values
    for p, path in zip(result.front, result.recipes, strict=True):
        cfg = load_config(path)
        assert cfg.defense.name == "hm"
        assert cfg.defense.hm_schedule == p["params"]["defense.hm_schedule"]
        assert cfg.defense.hm_u == pytest.approx(p["params"]["defense.hm_u"])

    c = MlflowClient(uri)
    parent = c.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    arts = {a.path for a in c.list_artifacts(result.parent_run_id, "pareto")}
    assert {"pareto/front.png", "pareto/front.json", "pareto/recipes"} <= arts
    kids = c.search_runs([parent.info.experiment_id],
                         filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(kids) == 4
    assert all(k.info.status in ("FINISHED", "KILLED") for k in kids)
    # at least one trial ran to the end; ASHA may have stopped others after the grace period
    assert any(k.info.status == "FINISHED" for k in kids)
    for k in kids:
        assert k.data.params["defense.name"] == "hm"
        assert "eval/recall_at_1" in k.data.metrics and "robust/ers" in k.data.metrics
        assert len(c.get_metric_history(k.info.run_id, "eval/recall_at_1")) >= 1


def test_trials_shard_their_robustness_evaluation_over_attack_workers(ray_local, tmp_path):
    """robustness.workers=1: each trial reserves one more CPU bundle and attacks on a Ray worker inside it."""
    from rdml.tune import load_space, run_search
    from rdml.tune.search import trial_resources

    space, _ = load_space("tune_spaces/hm_schedules.yaml")
    space = space.model_copy(update={
        "robustness": space.robustness.model_copy(update={"max_queries": 6, "workers": 1}),
        "params": {k: v for k, v in space.params.items() if k != "defense.pgd.steps"},
    })
    assert [dict(b) for b in trial_resources(space).bundles] == [{"CPU": 1.0}, {"CPU": 1.0}]
    result = run_search(space, overrides=[*TINY, "tracking.enabled=false", f"train.output_dir={tmp_path / 'runs'}"],
                        num_samples=1, storage_path=tmp_path / "tune")
    assert len(result.trials) == 1 and result.errors == 0
    assert 0 <= result.trials[0]["ers"]


def test_eat_trial_search_and_resume(ray_local, tmp_path):
    """An EAT trial (in-process ensemble) reports R@1 and ERS; --resume of a finished search reuses it."""
    from rdml.tracking import child_runs
    from rdml.tune import load_space, run_search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space, _ = load_space("tune_spaces/eat_modes.yaml")
    space = space.model_copy(update={
        "params": {"ensemble.self_transfer": {"grid": ["cross_member"]}, "ensemble.members": {"grid": [2]}},
        "robustness": space.robustness.model_copy(update={"max_queries": 6}),
        "resources": space.resources.model_copy(update={"cpu": 1}),
    })
    overrides = [*TINY, "train.epochs=1", f"tracking.uri={uri}", f"train.output_dir={tmp_path / 'runs'}"]
    first = run_search(space, overrides=overrides, storage_path=tmp_path / "tune")
    assert first.errors == 0 and len(first.trials) == 1
    t = first.trials[0]
    assert 0 < t["recall@1"] <= 1 and t["ers"] > 0
    kids = child_runs(first.parent_run_id, tracking=uri)
    assert len(kids) == 1 and kids[0].info.status == "FINISHED"
    assert kids[0].data.params["ensemble.members"] == "2"

    again = run_search(space, overrides=overrides, storage_path=tmp_path / "tune", resume=True)
    assert again.parent_run_id == first.parent_run_id
    assert [x["trial_id"] for x in again.trials] == [t["trial_id"]]
    assert len(child_runs(first.parent_run_id, tracking=uri)) == 1  # nothing was retrained
