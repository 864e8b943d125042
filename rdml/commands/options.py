"""argparse types that validate command-line numbers as the config validates its values.

A bad option fails at parse time, in about a second, with exit status 2 and a message that names the
option, the allowed range and what the option means, e.g. ``argument --batch-size: must be an integer
>= 1 (queries per attack batch), got 0``. Use ``type=at_least(1, "what it is")`` in ``add_argument``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: int, meaning: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum``."""
    about = f" ({meaning})" if meaning else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{about}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{about}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in some messages
    return parse
