"""The one metric registry (rdml.metrics): every reported number has one unit and one direction, and every
consumer (tables, JSON, MLflow names, checks) reads them from there; the masking check fires in every unit."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rdml.attacks.profiles import (
    CLUSTERING_KINDS,
    RANKING_KINDS,
    load_profile,
    parse_attack_spec,
    profile_names,
)
from rdml.attacks.ranking import ATTACKS
from rdml.eval.robust_checks import check_gradient_masking
from rdml.metrics import (
    COSINE,
    DISTANCE,
    FRACTION,
    HIGHER,
    LOWER,
    POINTS,
    lookup,
    registry,
    show,
    show_interval,
)
from rdml.tracking import metric_key

_EXAMPLE = {"CA:pm=+": "CA+", "CA:pm=-": "CA-", "QA:pm=+": "QA+", "QA:pm=-": "QA-", "SPQA:pm=+": "SPQA+",
            "SPQA:pm=-": "SPQA-"}


def test_every_attack_of_every_profile_reports_declared_metrics():
    for name in profile_names():
        for key, spec in load_profile(name).keyed():
            names = spec.metric_names() if spec.threat == "ranking" else ("nmi", "ari", "cluster_acc", "recall@1")
            for metric in names:
                full = f"attacks.{key}{metric[len(spec.base_name):]}" if spec.threat == "ranking" \
                    else f"clustering.{key}.{metric}"
                info = lookup(full)  # raises KeyError if nobody declared it
                assert info.unit in (FRACTION, COSINE, DISTANCE), (name, full)
                if spec.threat == "ranking" and not metric.endswith(":GT"):
                    assert info.good in (HIGHER, LOWER), (name, full)


def test_each_attack_class_declares_its_reports_once_and_unknown_metrics_are_refused():
    seen: dict[str, str] = {}
    for kind, cls in ATTACKS.items():
        for metric in cls.reports:
            assert metric not in seen or ATTACKS[seen[metric]] in cls.__mro__ or cls in ATTACKS[seen[metric]].__mro__, \
                (metric, kind, seen.get(metric))
            seen.setdefault(metric, kind)
    assert set(RANKING_KINDS) == set(ATTACKS) and set(CLUSTERING_KINDS).isdisjoint(ATTACKS)
    with pytest.raises(KeyError, match="not declared"):
        lookup("attacks.NEWATTACK")


def test_tables_json_and_mlflow_names_agree_on_units_and_directions():
    from rdml.eval.report_files import to_markdown

    reg = registry()
    keys = [f"attacks.{m}" for m in reg if m not in ("recall@1", "recall@2", "recall@4", "recall@8", "map", "map@r",
                                                    "nmi", "ari", "cluster_acc", "cluster_f1", "ers",
                                                    "embedding_spread", "collapse")]
    metrics = {k: 0.25 for k in keys}
    metrics.update({"recall@1": 0.5, "recall@2": 0.75, "map": 0.4, "nmi": 0.6, "ers": 42.0, "ci.ers.low": 40.0,
                    "ci.ers.high": 44.0})
    names = {metric_key(k) for k in metrics}
    assert len(names) == len(metrics)  # MLflow-safe names stay distinct
    assert json.loads(json.dumps(metrics)) == metrics  # the JSON holds the stored units unchanged
    md = to_markdown(metrics, "m")
    assert "| m | 50.0 | 75.0 | 40.0 | 60.0 |" in md  # fractions shown as %, once, by the registry
    assert "42.0 [40.0, 44.0]" in md  # ERS in points with its interval
    assert show("attacks.TMA", 0.25) == "0.250" and show("attacks.ES:D", 0.25) == "0.250"  # cosine, distance
    assert show("attacks.LTM", 0.25) == "25.0" and lookup("ers").unit == POINTS
    assert show_interval({"recall@1": 0.5, "ci.recall@1.low": 0.4, "ci.recall@1.high": 0.6}, "recall@1") == \
        "50.0 [40.0, 60.0]"
    for k in (k for k in metrics if not k.startswith("ci.")):  # every key resolves, in every style results use
        for variant in (k, f"ci.{k}.low", f"final/eval/{k}" if "." not in k else k):
            lookup(variant)


class Quantised(nn.Module):
    """Masked gradients by construction: inputs rounded to 4 levels (zero input gradient almost everywhere)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 3) / 3)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("attack,metric,unit", [
    ("CENTROID:centroids=kmeans:eps=32/255:alpha=8/255:pgditer=4", "nmi", FRACTION),
    ("TMA:eps=32/255:alpha=8/255:pgditer=4", "TMA", COSINE),
    ("ES:eps=16/255:alpha=4/255:pgditer=4", "ES:D", DISTANCE),
])
def test_masking_check_fires_in_every_unit(trained_tiny, digits_splits, attack, metric, unit):
    spec = parse_attack_spec(attack)
    info = lookup(f"clustering.x.{metric}" if spec.threat == "clustering" else f"attacks.{metric}")
    assert info.unit == unit and info.tolerance < 0.1  # a 1.0 tolerance could never fire on these units
    kw = dict(max_queries=96, batch_size=96, progress=False)
    healthy = check_gradient_masking(trained_tiny, digits_splits.test, spec, **kw)
    masked = check_gradient_masking(Quantised(trained_tiny), digits_splits.test, spec, **kw)
    assert healthy.metric == metric and not healthy.flagged, healthy
    assert masked.flagged, masked
