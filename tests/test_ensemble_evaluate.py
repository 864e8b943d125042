"""An EAT run can be evaluated, attacked and reported afterwards, from its run directory or a member file.

One tiny ensemble (2 members, 2 steps, quick attacks on 16 queries) is trained by the real command in
process; every number checked below is recomputed independently from the files on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rdml.cli import main
from rdml.data import build_datasets
from rdml.ensemble.checkpoint import load_manifest
from rdml.ensemble.combine import EnsembleModel
from rdml.ensemble.load import load_any_model, load_ensemble_model
from rdml.eval import evaluate_model
from rdml.models import build_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("eat") / "run"
    assert main(["ensemble", "--config", "digits-eat", "--no-ray", "--members", "2", "--run-dir", str(run),
                 "--set", "ensemble.parts=2", "--set", "ensemble.steps_per_epoch=2", "--set", "train.epochs=1",
                 "--set", "data.batch_pairs=8", "--set", "defense.pgd.steps=1", "--set", "eval.max_queries=16",
                 "--set", "eval.profile=quick", "--set", "tracking.enabled=false"]) == 0
    return run


def rebuilt_from_files(run: Path):
    """The members rebuilt by hand from manifest.json and the member files (no rdml loader involved)."""
    manifest = json.loads((run / "manifest.json").read_text())
    cfg = load_manifest(run).config
    test = build_datasets(cfg.data).test
    members = []
    for file in manifest["files"]:
        model = build_model(cfg.model, test.in_channels, test.image_size)
        model.load_state_dict(torch.load(run / file, weights_only=True)["model"])
        members.append(model.eval())
    return members, cfg, test


def test_evaluate_run_dir_gives_the_combined_ensemble(run_dir, tmp_path, capsys):
    out = tmp_path / "ens.json"
    assert main(["evaluate", str(run_dir), "--profile", "quick", "--max-queries", "16", "--json", str(out),
                 "--quiet"]) == 0
    metrics = json.loads(out.read_text())
    members, cfg, test = rebuilt_from_files(run_dir)
    expected = evaluate_model(EnsembleModel(members, cfg.ensemble.combine).eval(), test, cfg.data.eval_batch_size,
                              "cpu", seed=cfg.eval.kmeans_seed)
    for key in ("recall@1", "map@r", "nmi"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-9), key
    report = json.loads((run_dir / "ensemble_report.json").read_text())
    # the same numbers `rdml ensemble` computed at the end of training, benign and under the quick attacks
    assert metrics["recall@1"] == pytest.approx(report["benign"]["ensemble/recall@1"], abs=1e-9)
    assert metrics["ers"] == pytest.approx(report["robustness"]["ensemble"]["ers"], abs=1e-6)
    assert 0 < metrics["ers"] < 100 and metrics["profile"] == "quick"
    assert out.with_suffix(".per_query.parquet").exists() and out.with_suffix(".examples.pt").exists()
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0  # the single-model report of it
    assert f"| ens | {100 * metrics['recall@1']:.1f} " in (tmp_path / "rep" / "report.md").read_text()  # R@1 [interval]
    # the manifest itself is accepted too
    assert main(["evaluate", str(run_dir / "manifest.json"), "--profile", "quick", "--max-queries", "16",
                 "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["recall@1"] == metrics["recall@1"]


def test_evaluate_member_file_gives_that_member_alone(run_dir, tmp_path):
    manifest = load_manifest(run_dir)
    member_file = manifest.member_file(1)
    out = tmp_path / "m1.json"
    assert main(["evaluate", str(member_file), "--profile", "quick", "--max-queries", "16", "--json", str(out),
                 "--quiet"]) == 0
    metrics = json.loads(out.read_text())
    members, cfg, test = rebuilt_from_files(run_dir)
    expected = evaluate_model(members[1], test, cfg.data.eval_batch_size, "cpu", seed=cfg.eval.kmeans_seed)
    assert metrics["recall@1"] == pytest.approx(expected["recall@1"], abs=1e-9)
    report = json.loads((run_dir / "ensemble_report.json").read_text())
    assert metrics["recall@1"] == pytest.approx(report["benign"]["member_1/recall@1"], abs=1e-9)
    assert metrics["ers"] == pytest.approx(report["robustness"]["member_1"]["ers"], abs=1e-6)
    assert metrics["recall@1"] != pytest.approx(report["benign"]["member_0/recall@1"], abs=1e-9)


def test_library_loaders(run_dir):
    model, cfg = load_ensemble_model(run_dir)
    assert isinstance(model, EnsembleModel) and len(model.members) == 2 and not model.training
    assert cfg == load_manifest(run_dir).config
    member, _ = load_ensemble_model(load_manifest(run_dir).member_file(0))
    assert not isinstance(member, EnsembleModel)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model.members[0](x), member(x))
    loaded = load_any_model(run_dir)
    assert "2 members" in loaded.description and isinstance(loaded.model, EnsembleModel)


def test_attack_accepts_the_run_dir(run_dir, tmp_path, capsys):
    out = tmp_path / "a.json"
    assert main(["attack", str(run_dir), "--attack", "QA:pm=-:M=1:eps=0.03137:alpha=0.011764:pgditer=2",
                 "--max-queries", "8", "--json", str(out), "--quiet"]) == 0
    assert 0 <= json.loads(out.read_text())["attacks.QA-"] <= 1  # a fraction (rdml.metrics)


def test_report_of_the_ensemble_report_has_a_row_per_model(run_dir, tmp_path, capsys):
    report = json.loads((run_dir / "ensemble_report.json").read_text())
    assert main(["report", str(run_dir / "ensemble_report.json"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    for name in ("member_0", "member_1", "ensemble"):
        r1 = 100 * report["benign"][f"{name}/recall@1"]
        ers = report["robustness"][name]["ers"]
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{r1:.1f}" and cells[-1].split(" [")[0] == f"{ers:.1f}", row  # ERS [95% interval]
        assert "—" not in cells, row  # every column has a number: benign, ten ERS attacks, ERS
    assert "<table>" in (tmp_path / "rep" / "report.html").read_text()
    assert set(json.loads((tmp_path / "rep" / "metrics.json").read_text())) == {"member_0", "member_1", "ensemble"}


def test_report_and_evaluate_refuse_other_inputs_clearly(run_dir, tmp_path, capsys):
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2, 3]")
    assert main(["report", str(listing)]) == 2
    err = capsys.readouterr().err
    assert "neither an evaluation JSON nor an ensemble report" in err and "list" in err and "Traceback" not in err
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    assert main(["report", str(other)]) == 2
    assert "neither an evaluation JSON" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2  # a directory with neither checkpoints/last.pt nor manifest.json
    err = capsys.readouterr().err
    assert "manifest.json" in err and "checkpoints/last.pt" in err
    lone = tmp_path / "step-000002" / "member-0.pt"  # a member file outside its run directory
    lone.parent.mkdir()
    lone.write_bytes((run_dir / load_manifest(run_dir).files[0]).read_bytes())
    assert main(["evaluate", str(lone)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    renamed = tmp_path / "copy.pt"
    renamed.write_bytes(lone.read_bytes())
    assert main(["evaluate", str(renamed)]) == 2
    assert "ensemble member file" in capsys.readouterr().err
