"""Robustness report of an evaluation JSON (from `rdml evaluate --json`): Markdown + HTML table like the
paper's (benign R@1/R@2/mAP/NMI, every attack, ERS, collapse and gradient-masking flags), the per-query
Parquet, a robust-metric-vs-eps plot and a clean-vs-adversarial retrieval panel, written to --out.

Also takes the ensemble_report.json that `rdml ensemble` writes into its run directory: the same tables
with one row per member and one for the combined ensemble.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rdml.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("eval_json", help="JSON written by `rdml evaluate --json`, or a run's ensemble_report.json")
    parser.add_argument("--out", default=None, help="output directory (default: <json stem>_report next to it)")
    parser.add_argument("--name", default=None, help="model name in the table (default: the JSON file stem)")


def run(args: argparse.Namespace) -> int:
    from rdml.eval.report_files import report_models, write_models_report, write_report

    src = Path(args.eval_json)
    if not src.is_file():
        raise ConfigError(f"{src} does not exist; write one with `rdml evaluate CHECKPOINT --profile rob28 --json {src}`")
    try:
        data = json.loads(src.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{src} is not valid JSON ({exc}); pass the file written by `rdml evaluate --json`") from None
    models = report_models(data, src)
    out = Path(args.out) if args.out else src.with_name(f"{src.stem}_report")
    if models is not None:
        title = args.name or (src.parent.name if src.name == "ensemble_report.json" else src.stem)
        written = write_models_report(models, out, title=title)
    else:
        written = write_report(data, out, name=args.name or src.stem,
                               per_query=src.with_suffix(".per_query.parquet"), examples=src.with_suffix(".examples.pt"))
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0
