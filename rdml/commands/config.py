"""Print the fully validated config: defaults, then the recipe or file, then --set overrides."""

from __future__ import annotations

import argparse

from rdml.commands.common import add_config_arguments, config_from_args
from rdml.config import recipe_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--recipes", action="store_true", help="list the shipped recipes instead")


def run(args: argparse.Namespace) -> int:
    if args.recipes:
        print("\n".join(recipe_names()))
        return 0
    print(config_from_args(args).to_yaml(), end="")
    return 0
