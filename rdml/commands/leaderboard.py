"""Collect robustness cards into one sorted table and a robust-vs-clean plot.

Cards come from folders (`rdml evaluate` writes them to ./rdml-cards/ or beside --json; evaluation
JSONs written before cards existed are read as legacy cards) or, with --experiment, from the cards/
artifacts of every run of an MLflow experiment (the store of --set tracking.uri=..., else
$MLFLOW_TRACKING_URI, else ./mlflow.db). Cards are grouped by threat model (data set, profile, suite
digest) and sorted best first by --sort in its robust direction; fractions are shown as percent, ERS in
points, 95% intervals in brackets.

    rdml leaderboard rdml-cards/
    rdml leaderboard --experiment robust28 --sort worst.recall@1 --html board.html --plot board.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rdml.commands.common import add_config_arguments, config_from_args
from rdml.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rdml.eval.leaderboard import SORT_KEYS

    parser.add_argument("folders", nargs="*", help="folders (or card files) to collect cards from")
    parser.add_argument("--experiment", default=None, help="also collect the cards of every run of this MLflow experiment")
    parser.add_argument("--sort", default="ers", choices=SORT_KEYS, help="sort by this metric (default: ers)")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="also write the Markdown table here")
    parser.add_argument("--html", default=None, metavar="PATH", help="also write the table as an HTML page here")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write the robust-vs-clean plot (PNG) here")
    add_config_arguments(parser)


def cards_in_experiment(experiment: str, tracking: Any) -> list:
    """The ``cards/`` artifacts of every run of an MLflow experiment (this command is the MLflow edge)."""
    from rdml import tracking as mlflow_io
    from rdml.eval.cards import ARTIFACT_DIR, CARD_SUFFIX, read_card
    from rdml.eval.leaderboard import Entry

    entries = []
    for run_id in mlflow_io.experiment_run_ids(experiment, tracking):
        for name in mlflow_io.list_artifacts(run_id, ARTIFACT_DIR, tracking=tracking):
            if name.endswith(CARD_SUFFIX):
                path = mlflow_io.download_artifact(run_id, name, tracking=tracking)
                entries.append(Entry(f"runs:/{run_id}/{name}", read_card(path)))
    return entries


def run(args: argparse.Namespace) -> int:
    from rdml.eval.leaderboard import cards_in_folders, plot, rows, sorted_groups, to_html, to_markdown

    if not args.folders and not args.experiment:
        raise ConfigError("nothing to collect: pass folders of cards (e.g. rdml-cards/) and/or --experiment NAME")
    entries = cards_in_folders(args.folders)
    if args.experiment:
        cfg = config_from_args(args)
        entries += cards_in_experiment(args.experiment, cfg.tracking)
    if not entries:
        raise ConfigError("no robustness cards found; `rdml evaluate ... --profile rob28` writes one per evaluation "
                          "(./rdml-cards/, beside --json, or the cards/ artifacts of a --track run)")
    groups = sorted_groups(entries, args.sort)
    table = rows(groups)
    text = to_markdown(table)
    print(text, end="")
    for path, content in ((args.markdown, text), (args.html, to_html(table) if args.html else "")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)
            print(f"wrote {path}")
    if args.plot:
        print(f"wrote {plot(groups, args.plot, robust=args.sort if args.sort != 'recall@1' else 'ers')}")
    return 0
