"""Arguments shared by the sub-commands that take an experiment config."""

from __future__ import annotations

import argparse

from rdml.config import ExperimentConfig, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE|RECIPE`` and repeatable ``--set a.b=c``."""
    parser.add_argument("--config", "-c", default=None, help="YAML file or shipped recipe name (default: digits defaults)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted override, e.g. --set train.epochs=3 (repeatable)",
    )


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> ExperimentConfig:
    """The validated config from ``--config`` plus ``--set`` overrides plus command-specific ones."""
    return load_config(args.config, [*args.overrides, *(extra or [])])
