"""The ``rdml`` command line.

Each sub-command lives in its own module under :mod:`rdml.commands` exposing ``add_arguments(parser)``
and ``run(args) -> int``. This file only wires them together and turns :class:`RdmlError` into a
clear message and exit status 2 (no traceback), so users see the problem and its fix, and an interrupt
into one line and the shell's status for it (130 for Ctrl-C, 143 for SIGTERM; ``rdml train`` handles
its own, see :mod:`rdml.train.stop`). ``rdml --version`` prints the installed version.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rdml import __version__
from rdml.errors import RdmlError
from rdml.extras import missing_extra

COMMANDS: dict[str, str] = {
    "train": "train one model (Ray Train; --workers N for DDP)",
    "ensemble": "train an EAT ensemble, one Ray actor per member",
    "evaluate": "benign metrics and (with --profile) the attack suite and ERS of a checkpoint",
    "attack": "run one attack on a checkpoint, optionally saving the adversarial images",
    "report": "robustness report (Markdown/HTML table, plots) of an evaluation JSON",
    "leaderboard": "robustness cards of many evaluations (folders or an MLflow experiment) in one sorted table",
    "tune": "search hardness schedules with Ray Tune",
    "datasets": "list the datasets and whether each is present",
    "ui": "start the MLflow UI on the configured store (127.0.0.1)",
    "config": "print the validated config (defaults, recipe, overrides)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdml", description="Adversarially robust deep metric learning.")
    parser.add_argument("--version", action="version", version=f"rdml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"rdml.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except RdmlError as err:
        print(f"rdml {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # Ray, MLflow, torchvision, faiss: name the pip extra (rdml.extras)
        missing = missing_extra(exc)
        if missing is None:
            raise
        print(f"rdml {args.command}: error: {missing}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # rdml.train.stop.Interrupted carries SIGTERM's status too
        print(f"rdml {args.command}: interrupted; checkpoints written so far are kept", file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))


if __name__ == "__main__":
    sys.exit(main())
