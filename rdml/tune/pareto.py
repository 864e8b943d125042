"""Pareto fronts over trial results (e.g. benign R@1 against ERS): computed, tabulated, plotted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def dominates(a: Mapping[str, float], b: Mapping[str, float], objectives: Mapping[str, str]) -> bool:
    """True if ``a`` is at least as good as ``b`` on every objective and better on one."""
    better = False
    for key, mode in objectives.items():
        x, y = float(a[key]), float(b[key])
        if mode == "min":
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_front(points: Sequence[Mapping[str, Any]], objectives: Mapping[str, str]) -> list[Mapping[str, Any]]:
    """The non-dominated points (those with every objective present), in input order."""
    valid = [p for p in points if all(p.get(k) is not None for k in objectives)]
    return [p for p in valid if not any(dominates(q, p, objectives) for q in valid if q is not p)]


def front_table(front: Sequence[Mapping[str, Any]], objectives: Mapping[str, str], param_keys: Sequence[str],
                title: str = "Pareto front") -> Any:
    """A rich Table of the front: trial, objectives, sampled params."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("trial")
    for key, mode in objectives.items():
        table.add_column(f"{key} ({mode})", justify="right")
    for key in param_keys:
        table.add_column(key.split(".")[-1])
    for p in sorted(front, key=lambda p: -float(p[next(iter(objectives))])):
        row = [str(p.get("trial_id", ""))]
        row += [f"{float(p[k]):.4f}" for k in objectives]
        row += [_fmt(p.get("params", {}).get(k)) for k in param_keys]
        table.add_row(*row)
    return table


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
