"""The worst-case ranking suite: per item never better than any of its attacks, exact at eps 0, flags masking.

The suite is run on the tiny trained digits model with a small profile of the same shape as
``worst28`` (fixed-step attacks, an APGD-rule attack, the black-box search, a transfer attack), so the
test stays fast; the shipped ``worst28``/``worst224`` profiles are checked for loading only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from rdml.attacks.profiles import load_profile, profile_from_dict
from rdml.errors import ConfigError
from rdml.eval.cards import read_card, validate_card
from rdml.eval.robustness import evaluate_robustness

pytestmark = pytest.mark.usefixtures("one_thread")


def small_suite(eps: str = "77/255") -> dict:
    return {
        "name": "worst-test",
        "ers": False,
        "budget": {"eps": eps, "alpha": "12/255", "steps": 6, "norm": "linf"},
        "attacks": ["CA:pm=+:W=1", "QA:pm=-:M=1", "ES", "LTM", "LTM:step=apgd:pgditer=8:label=apgd/LTM"],
        "worst_case": {"version": 1, "blackbox": {"queries": 40, "p_init": 0.8}, "transfer": ["ES:pgditer=6"]},
    }


class Quantised(nn.Module):
    """Gradient masking by construction: inputs rounded to 4 levels (zero input gradient almost everywhere)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 3) / 3)


def test_shipped_worst_case_profiles_load():
    for name in ("worst28", "worst224"):
        prof = load_profile(name)
        assert prof.worst_case is not None and prof.worst_case.transfer and prof.worst_case.blackbox


def test_worst_case_is_never_better_than_any_attack_per_item(trained_tiny, digits_splits):
    res = evaluate_robustness(trained_tiny, digits_splits.test, profile_from_dict(small_suite()), max_queries=48,
                              batch_size=48, progress=False, surrogate=trained_tiny, intervals=50)
    wc = res.worst
    worst_r1, worst_ap, worst_rank = (wc.per_query[f"worst.{m}"] for m in ("recall@1", "map", "rank"))
    assert set(wc.group_of.values()) == {"whitebox", "blackbox", "transfer"}
    for key, member in wc.members.items():  # every attack of the suite, per item
        assert np.all(worst_r1 <= member["recall@1"]), key
        assert np.all(worst_ap <= member["map"] + 1e-12), key
        assert np.all(worst_rank >= member["rank"]), key
    assert np.all(worst_r1 <= wc.clean["recall@1"]) and np.all(worst_ap <= wc.clean["map"] + 1e-12)
    best_single = min(float(np.mean(m["recall@1"])) for k, m in wc.members.items() if wc.group_of[k] == "whitebox")
    assert res["worst.recall@1"] <= best_single
    assert res["worst.recall@1"] < float(np.mean(wc.clean["recall@1"])) - 0.3  # an undefended model breaks
    assert "ci.worst.recall@1.low" in res.intervals or any(k.startswith("ci.worst.") for k in res)
    assert res["worst.masking"] == 0.0, wc.reasons


def test_zero_budget_reproduces_the_benign_values_exactly(trained_tiny, digits_splits):
    from rdml.eval.embed import embed
    from rdml.eval.metrics import benign_metrics

    res = evaluate_robustness(trained_tiny, digits_splits.test, profile_from_dict(small_suite(eps="0")),
                              max_queries=40, batch_size=40, progress=False, surrogate=trained_tiny)
    wc = res.worst
    for m in ("recall@1", "map", "rank"):
        assert np.array_equal(wc.per_query[f"worst.{m}"], wc.clean[m]), m
    every_query = evaluate_robustness(trained_tiny, digits_splits.test, profile_from_dict(small_suite(eps="0")),
                                      max_queries=None, batch_size=512, progress=False)
    emb, labels = embed(trained_tiny, digits_splits.test, batch_size=512)
    benign = benign_metrics(emb, labels, seed=0)
    assert every_query["worst.recall@1"] == pytest.approx(benign["recall@1"], abs=1e-9)
    assert every_query["worst.map"] == pytest.approx(benign["map"], abs=1e-9)


def test_masked_gradients_are_flagged_by_the_weaker_attacks(trained_tiny, digits_splits):
    res = evaluate_robustness(Quantised(trained_tiny), digits_splits.test, profile_from_dict(small_suite()),
                              max_queries=48, batch_size=48, progress=False, surrogate=trained_tiny)
    assert res["worst.masking"] == 1.0 and res.worst.flagged
    assert any("beat the white-box attacks" in r for r in res.worst.reasons), res.worst.reasons


def test_a_card_is_written_validated_and_newer_versions_refused(trained_tiny, digits_splits, tmp_path):
    import rdml

    card_file = tmp_path / "tiny.card.json"
    rdml.evaluate(trained_tiny, digits_splits.test, profile=profile_from_dict(small_suite()), max_queries=24,
                  batch_size=24, surrogate=trained_tiny, card=card_file, progress=False)
    card = read_card(card_file)
    assert card["threat_model"]["eps"] == pytest.approx(77 / 255)
    assert card["worst_case"] is not None and card["queries"] == 24
    data = json.loads(card_file.read_text())
    data["version"] = 99
    with pytest.raises(ConfigError, match="version"):
        validate_card(data)
