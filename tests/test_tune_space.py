"""Search-space files: the shipped ones load; mistakes fail in the driver with the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rdml.errors import ConfigError
from rdml.tune import apply_params, load_space, pareto_front
from rdml.tune.space import to_param_space

SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"


@pytest.mark.parametrize("name", ["hm_schedules", "ics_weight", "eat_modes"])
def test_shipped_spaces_load_and_cover_their_keys(name):
    space, base = load_space(SPACES / f"{name}.yaml")
    assert space.all_objectives == {"recall@1": "max", "ers": "max"}
    for key, values in space.sample_values().items():
        for v in values:
            cfg = apply_params(base, {key: v})
            node = cfg.to_dict()
            for part in key.split("."):
                node = node[part]
            assert node == v


def test_hm_space_searches_the_whole_gradual_adversary_family():
    space, base = load_space(SPACES / "hm_schedules.yaml")
    assert set(space.params["defense.hm_schedule"]["choice"]) == {"lga", "boost", "g2", "gsqrt", "constant", "linear"}
    assert {"defense.hm_src", "defense.pgd.steps", "defense.hm_u", "defense.hm_xi"} <= set(space.params)
    assert base.defense.name == "hm"
    ps = to_param_space(space)
    assert set(ps) == set(space.params)


def _write(tmp_path, **overrides):
    data = {"name": "t", "base": "digits", "params": {"defense.hm_schedule": {"choice": ["lga"]}}}
    data.update(overrides)
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_config_key_names_the_key_and_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"params\.defense\.hm_schedul.*not a config key.*hm_schedule"):
        load_space(_write(tmp_path, params={"defense.hm_schedul": {"choice": ["lga"]}}))


def test_bad_value_names_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"params\.defense\.hm_schedule: value 'lgaa'.*'lga'.*'boost'"):
        load_space(_write(tmp_path, params={"defense.hm_schedule": {"choice": ["lga", "lgaa"]}}))
    with pytest.raises(ConfigError, match=r"params\.defense\.pgd\.steps: value -1"):
        load_space(_write(tmp_path, params={"defense.pgd.steps": {"randint": [-1, 4]}}))


def test_malformed_distribution_and_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"params.*kind one of choice, grid, uniform"):
        load_space(_write(tmp_path, params={"defense.hm_u": {"normal": [0, 1]}}))
    with pytest.raises(ConfigError, match=r"low must be < high"):
        load_space(_write(tmp_path, params={"defense.hm_u": {"uniform": [0.4, 0.1]}}))
    with pytest.raises(ConfigError, match=r"sheduler: unknown key; allowed: .*scheduler"):
        load_space(_write(tmp_path, sheduler={"asha": {}}))
    with pytest.raises(ConfigError, match=r"objective 'ers' needs robustness"):
        load_space(_write(tmp_path, objectives={"recall@1": "max", "ers": "max"}, robustness=None))


def test_pareto_front_keeps_exactly_the_non_dominated_points():
    pts = [
        {"trial_id": "a", "recall@1": 0.9, "ers": 10.0},
        {"trial_id": "b", "recall@1": 0.8, "ers": 30.0},
        {"trial_id": "c", "recall@1": 0.7, "ers": 20.0},  # dominated by b
        {"trial_id": "d", "recall@1": 0.9, "ers": 5.0},  # dominated by a
        {"trial_id": "e", "recall@1": 0.6, "ers": 40.0},
        {"trial_id": "f", "recall@1": 0.95},  # no ERS: not comparable
    ]
    front = pareto_front(pts, {"recall@1": "max", "ers": "max"})
    assert [p["trial_id"] for p in front] == ["a", "b", "e"]
    assert [p["trial_id"] for p in pareto_front(pts[:5], {"recall@1": "min"})] == ["e"]
