"""List the datasets rdml knows, where each is looked for, whether it is there, and split sizes.

Roots: ``--root-dir DIR`` means DIR holds one folder per dataset (DIR/cub, DIR/sop, ...); otherwise
``data.root`` (from --config/--set) applies to ``data.name`` and the others use $RDML_DATA/<name> or
~/.rdml/data/<name>. Only listing files are read (and their manifests written), not the images,
unless ``--check``: then every listed image file must exist and its header must decode (a thread pool;
the verdicts are cached in the manifest, so a second check only stats unchanged files), and a data set
with missing or unreadable files is shown as invalid, with the first one named. Exit status 1 when a
checked data set is invalid.

Examples::

    rdml datasets                       # what is where
    rdml datasets --check cub           # every CUB image exists and decodes
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rdml.commands.common import add_config_arguments, config_from_args
from rdml.data.registry import DATASET_NAMES, DatasetStatus, dataset_status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--root-dir", type=Path, default=None, metavar="DIR",
                        help="parent directory with one folder per dataset (DIR/<name>)")
    parser.add_argument("--check", action="store_true",
                        help="also check that every listed image file exists and decodes (cached in the manifest)")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"datasets to check (default: all of {', '.join(DATASET_NAMES)})")


def _counts(st: DatasetStatus) -> tuple[str, str]:
    def fmt(split: str) -> str:
        n, k = st.counts[split]
        return f"{n:,} imgs / {k:,} cls"

    train = fmt("train") if "train" in st.counts else ""
    if "test" in st.counts:
        test = fmt("test")
    elif "query" in st.counts:
        test = f"query {fmt('query')}; gallery {fmt('gallery')}"
    else:
        test = ""
    return train, test


def render(statuses: list[DatasetStatus]) -> None:
    """Print the status table with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rdml datasets")
    for col in ("dataset", "root", "status", "train", "test", "note"):
        table.add_column(col, overflow="fold")
    style = {"present": "green", "bundled": "green", "missing": "yellow", "invalid": "red"}
    for st in statuses:
        train, test = _counts(st)
        root = "(embedded)" if st.root is None else str(st.root)
        table.add_row(f"{st.name}\n[dim]{st.title}[/dim]", root, f"[{style[st.state]}]{st.state}[/]",
                      train, test, st.message)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not fold paths at 80 columns
        console = Console(width=200)
    console.print(table)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    unknown = [n for n in args.names if n not in DATASET_NAMES]
    if unknown:
        from rdml.errors import ConfigError

        raise ConfigError(f"unknown dataset(s) {unknown}; known: {', '.join(DATASET_NAMES)}")
    statuses = dataset_status(cfg.data, names=args.names or None, root_dir=args.root_dir, check=args.check)
    render(statuses)
    if args.check and any(st.state == "invalid" for st in statuses):
        return 1
    return 0
