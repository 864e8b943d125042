"""Robustness evaluation end to end: monotonicity, PGD vs noise, ERS of an undefended model,
gradient-masking guard, report files, and the evaluate / attack / report commands."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from rdml.attacks.profiles import AttackProfile, load_profile, parse_attack_spec
from rdml.eval.report_files import flags, to_markdown, write_report
from rdml.eval.robust_checks import check_gradient_masking, noise_baseline, robust_curve
from rdml.eval.robustness import evaluate_robustness

pytestmark = pytest.mark.usefixtures("one_thread")
KW = dict(max_queries=64, batch_size=64, progress=False)


def test_robust_r1_and_nmi_do_not_increase_with_eps_and_pgd_beats_noise(trained_tiny, digits_splits):
    test = digits_splits.test
    grid = [0.0, 8 / 255, 24 / 255, 77 / 255]
    for attack, metric in (("ES:eps=77/255:alpha=12/255:pgditer=8", "ES:R"), ("LTM:eps=77/255:alpha=12/255:pgditer=8", "LTM")):
        curve = list(robust_curve(trained_tiny, test, attack, grid, metric, **KW).values())  # robust R@1, a fraction
        assert all(b <= a + 1e-9 for a, b in zip(curve, curve[1:], strict=False)), (attack, curve)
        assert curve[-1] < curve[0] - 0.4, (attack, curve)
    nmi = list(robust_curve(trained_tiny, test, "CENTROID:centroids=class:dynamic=1:eps=77/255:alpha=12/255:pgditer=6",
                            grid, max_queries=200, batch_size=100, progress=False).values())
    assert all(b <= a + 0.02 for a, b in zip(nmi, nmi[1:], strict=False)) and nmi[-1] < nmi[0] - 0.2, nmi
    ltm = "LTM:eps=77/255:alpha=12/255:pgditer=8"
    noise = noise_baseline(trained_tiny, test, ltm, **KW)
    pgd_r1 = robust_curve(trained_tiny, test, ltm, [77 / 255], **KW)[77 / 255]
    assert noise > pgd_r1 + 0.4, (noise, pgd_r1)


@pytest.mark.slow
def test_undefended_digits_model_is_broken_by_rob28(trained_tiny, digits_splits):
    res = evaluate_robustness(trained_tiny, digits_splits.test, "rob28", **KW)
    print(f"rob28 on the undefended tiny digits model (64 queries): ERS = {res['ers']:.2f}",
          {k: round(v, 3) for k, v in res.items()})
    assert res["ers"] < 15
    assert res["attacks.LTM"] < 0.1 and res["attacks.CA+"] < 0.1 and res["attacks.QA-"] > 0.8
    assert res["collapse"] == 0.0
    assert res.passes == {k: 32 for k in ("CA+", "CA-", "QA+", "QA-", "TMA", "ES", "LTM", "GTM", "GTT")}


class Quantised(nn.Module):
    """Gradient masking by construction: inputs rounded to 4 levels (zero input gradient almost everywhere)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 3) / 3)


def test_gradient_masking_guard(trained_tiny, digits_splits):
    test = digits_splits.test
    spec = parse_attack_spec("ES:eps=16/255:alpha=4/255:pgditer=4")
    # the check watches ES:D (what ES maximises), with the registry's direction, tolerance and best value
    kw = dict(max_queries=48, batch_size=48, progress=False)
    ok = check_gradient_masking(trained_tiny, test, spec, **kw)
    assert not ok.flagged, ok
    masked = check_gradient_masking(Quantised(trained_tiny), test, spec, **kw)
    assert masked.flagged and "eps did not make" in masked.reason, masked
    assert masked.as_metrics()["masking.flag"] == 1.0


def test_report_files_and_flags(trained_tiny, digits_splits, tmp_path):
    res = evaluate_robustness(trained_tiny, digits_splits.test, "quick", max_queries=32, batch_size=32,
                              progress=False, keep_examples=3)
    metrics = {"recall@1": 0.8, "recall@2": 0.9, "map": 0.5, "nmi": 0.6, **res,
               "curve.ES:R.eps=0.00000": 80.0, "curve.ES:R.eps=0.15000": 20.0, "curve.ES:R.eps=0.30196": 0.0}
    pq_path = res.write_parquet(tmp_path / "eval.per_query.parquet")
    written = write_report(metrics, tmp_path / "out", name="tiny", per_query=pq_path, examples=res.examples)
    assert set(written) == {"curve", "examples", "per_query", "markdown", "html", "json"}
    md = written["markdown"].read_text()
    assert "| tiny | 80.0 | 90.0 | 50.0 | 60.0 |" in md and "ERS↑" in md and f"{res['ers']:.1f}" in md
    assert "<table>" in written["html"].read_text()
    table = pq.read_table(written["per_query"]).to_pandas()
    assert len(table) == 32 * 10 and set(table["metric"]) >= {"CA+", "ES:D", "ES:R", "GTT"}
    assert table.groupby("metric")["value"].mean()["ES:D"] == pytest.approx(res["attacks.ES:D"])
    assert written["examples"].stat().st_size > 1000
    collapsed = {"recall@1": 0.008, "ers": 29.7}
    assert flags(collapsed) and "COLLAPSE" in to_markdown(collapsed) and "(collapse)" in to_markdown(collapsed)


def test_single_attack_profile_keys_and_ranking_metrics_direction(trained_tiny, digits_splits):
    prof = AttackProfile(name="two", attacks=(parse_attack_spec("QA:pm=+:eps=0"), parse_attack_spec("QA:pm=+:eps=77/255:alpha=12/255:pgditer=6")))
    assert [k for k, _ in prof.keyed()] == ["QA+:M=1:eps=0", "QA+:M=1:eps=0.302"]
    res = evaluate_robustness(trained_tiny, digits_splits.test, prof, **KW)
    assert res["attacks.QA+:M=1:eps=0.302"] < 0.05 < 0.3 < res["attacks.QA+:M=1:eps=0"]


@pytest.mark.slow
def test_evaluate_attack_report_commands(tiny_config, tmp_path, capsys):
    from rdml.cli import main
    from rdml.train import fit

    result = fit(tiny_config)
    ckpt = result.checkpoint
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(ckpt), "--profile", "quick", "--max-queries", "16", "--json", str(out),
                 "--curve", "--quiet", "--track"]) == 0
    assert "logged to MLflow run" in capsys.readouterr().out
    metrics = json.loads(out.read_text())
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map", "map@r", "nmi", "ari", "cluster_acc",
                "cluster_f1", "ers", "attacks.CA+", "attacks.GTT", "curve.ES:R.eps=0.00000"):
        assert key in metrics, key
    assert 0 <= metrics["recall@1"] <= 1
    assert out.with_suffix(".per_query.parquet").exists() and out.with_suffix(".examples.pt").exists()
    card = json.loads((tmp_path / "eval.card.json").read_text())  # the robustness card, beside the JSON...
    assert card["suite"]["profile"] == "quick" and card["queries"] == 16 and card["mlflow"]["run_id"]
    assert card["ers"]["ers"]["value"] == pytest.approx(metrics["ers"])
    uri, experiment = tiny_config.tracking.uri, tiny_config.tracking.experiment  # ...and in the run's cards/
    assert main(["leaderboard", "--experiment", experiment, "--set", f"tracking.uri={uri}"]) == 0
    assert card["mlflow"]["run_id"] in capsys.readouterr().out
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "robust_curve.png").exists()
    adv_dir = tmp_path / "adv"
    assert main(["attack", str(ckpt), "--attack", "QA:pm=-:M=1:eps=0.03137:alpha=0.011764:pgditer=3",
                 "--max-queries", "8", "--save-images", str(adv_dir), "--quiet"]) == 0
    saved = torch.load(adv_dir / "adv.pt")
    assert (saved["adv"] - saved["clean"]).abs().max() <= 0.03137 + 1e-6
    assert (adv_dir / "grid.png").exists()
    assert main(["report", str(tmp_path / "missing.json")]) == 2


def test_quick_profile_is_cheap():
    prof = load_profile("quick")
    assert prof.max_queries == 64 and all(s.steps == 4 for s in prof.attacks)
