"""Config loading, overrides and error messages."""

from __future__ import annotations

import pytest

from rdml.config import build_config, load_config, recipe_names
from rdml.errors import ConfigError


def test_defaults_are_the_embedded_digits_setup():
    cfg = load_config(None)
    assert cfg.data.name == "digits"
    assert cfg.model.arch == "c2f2"
    assert cfg.loss.margin == pytest.approx(0.2)


def test_dotted_overrides_are_typed():
    cfg = load_config("digits", ["train.epochs=3", "defense.pgd.eps=0.1", "tracking.enabled=false"])
    assert cfg.train.epochs == 3
    assert cfg.defense.pgd.eps == pytest.approx(0.1)
    assert cfg.tracking.enabled is False


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("defense.pgd.eps=-0.1", "defense.pgd.eps"),
        ("data.batch_pairs=0", "data.batch_pairs"),
        ("data.name=imagenet", "'digits'"),
        ("trian.epochs=3", "trian: unknown key"),
        ("loss.sampler=easy", "loss.sampler"),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_override_syntax_error_explains_the_form():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.epochs"])


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="digits"):
        load_config("no-such-recipe")


def test_every_shipped_recipe_validates():
    names = recipe_names()
    assert "digits" in names
    for name in names:
        load_config(name)


def test_ics_requires_hm():
    with pytest.raises(ConfigError, match="defense.ics"):
        build_config({"defense": {"name": "act", "ics": True}})


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("digits", ["train.seed=7"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
