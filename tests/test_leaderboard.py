"""`rdml leaderboard`: cards of two evaluations, from a folder and from an MLflow experiment, in one sorted table."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from rdml.attacks.profiles import profile_from_dict
from rdml.cli import main
from rdml.config import build_config
from rdml.eval.controls import ShrunkModel

pytestmark = pytest.mark.usefixtures("one_thread")

PROFILE = {"name": "board-test", "ers": True, "budget": {"eps": "77/255", "alpha": "12/255", "steps": 4, "norm": "linf"},
           "attacks": ["CA:pm=+:W=1", "CA:pm=-:W=1", "QA:pm=+:M=1", "QA:pm=-:M=1", "TMA", "ES", "LTM", "GTM", "GTT"]}


@pytest.fixture(scope="module")
def two_cards(trained_tiny, digits_splits, tmp_path_factory):
    """Cards of the trained tiny model and of an untrained copy of it (two fixture evaluations)."""
    import rdml

    folder = tmp_path_factory.mktemp("cards")
    evals = {}
    torch.manual_seed(1)
    untrained = copy.deepcopy(trained_tiny)
    for module in untrained.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    for name, model in (("tiny", trained_tiny), ("untrained", untrained)):
        evals[name] = rdml.evaluate(model, digits_splits.test, profile=profile_from_dict(PROFILE), max_queries=24,
                                    batch_size=24, intervals=50, name=name, card=folder / f"{name}.card.json")
    return folder, evals


def _board_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| #")]


def test_leaderboard_of_a_folder_is_sorted_by_ers_with_intervals(two_cards, tmp_path, capsys):
    folder, evals = two_cards
    html, png = tmp_path / "board.html", tmp_path / "board.png"
    assert main(["leaderboard", str(folder), "--html", str(html), "--plot", str(png)]) == 0
    table = _board_rows(capsys.readouterr().out)
    assert [r[1] for r in table] == sorted(evals, key=lambda n: -evals[n].metrics["ers"])
    ers_cells = [r[7] for r in table]
    for cell, name in zip(ers_cells, (r[1] for r in table), strict=True):
        assert cell.startswith(f"{evals[name].metrics['ers']:.1f}") and re.search(r"\[[\d.]+, [\d.]+\]", cell), cell
    assert "<table" in html.read_text() and png.stat().st_size > 1000


def test_leaderboard_of_an_mlflow_experiment(two_cards, tmp_path, capsys):
    from rdml import tracking

    folder, evals = two_cards
    uri = f"sqlite:///{tmp_path / 'board.db'}"
    cfg = build_config({"tracking": {"uri": uri, "experiment": "board"}})
    for name in evals:  # two fixture runs, each with its card logged as `rdml evaluate --track` logs it
        run_id = tracking.start_run(cfg, run_name=name)
        tracking.log_artifact(run_id, folder / f"{name}.card.json", "cards", tracking=uri)
        tracking.end_run(run_id, tracking=uri)
    assert main(["leaderboard", "--experiment", "board", "--set", f"tracking.uri={uri}", "--sort", "ers"]) == 0
    table = _board_rows(capsys.readouterr().out)
    assert sorted(r[1] for r in table) == sorted(evals) and all(len(r[-1]) == 32 or r[-1] == "-" for r in table)


def test_leaderboard_errors_name_the_fix(tmp_path, capsys):
    assert main(["leaderboard"]) == 2
    assert "pass folders of cards" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["leaderboard", str(tmp_path / "empty")]) == 2
    assert "no robustness cards found" in capsys.readouterr().err
    assert main(["leaderboard", "--experiment", "nope", "--set", f"tracking.uri=sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


def test_shrunk_control_card_keeps_the_clean_ranking(two_cards, trained_tiny, digits_splits, tmp_path):
    """A scale-only copy gets a card with the same clean R@1 (the table's clean column is not fooled)."""
    import rdml

    folder, evals = two_cards
    run = rdml.evaluate(ShrunkModel(trained_tiny), digits_splits.test, profile=profile_from_dict(PROFILE),
                        max_queries=24, batch_size=24, intervals=50, name="shrunk", card=tmp_path / "s.card.json")
    assert run.metrics["recall@1"] == pytest.approx(evals["tiny"].metrics["recall@1"])
