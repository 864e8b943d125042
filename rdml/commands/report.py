"""Robustness report of an evaluation JSON (from `rdml evaluate --json`): Markdown + HTML table like the
paper's (benign R@1/R@2/mAP/NMI, every attack, ERS, collapse and gradient-masking flags), the per-query
Parquet, a robust-metric-vs-eps plot and a clean-vs-adversarial retrieval panel, written to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rdml.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("eval_json", help="JSON written by `rdml evaluate --json`")
    parser.add_argument("--out", default=None, help="output directory (default: <json stem>_report next to it)")
    parser.add_argument("--name", default=None, help="model name in the table (default: the JSON file stem)")


def run(args: argparse.Namespace) -> int:
    from rdml.eval.report import write_report

    src = Path(args.eval_json)
    if not src.exists():
        raise ConfigError(f"{src} does not exist; write one with `rdml evaluate CHECKPOINT --profile rob28 --json {src}`")
    try:
        metrics = json.loads(src.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{src} is not valid JSON ({exc}); pass the file written by `rdml evaluate --json`") from None
    out = Path(args.out) if args.out else src.with_name(f"{src.stem}_report")
    written = write_report(metrics, out, name=args.name or src.stem,
                           per_query=src.with_suffix(".per_query.parquet"), examples=src.with_suffix(".examples.pt"))
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0
