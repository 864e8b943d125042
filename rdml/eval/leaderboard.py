"""The leaderboard: robustness cards of many evaluations in one sorted table and one plot.

Why: a card (:mod:`rdml.eval.cards`) records one model under one suite; comparing defenses means
reading many of them side by side, with their intervals, under the *same* threat model. The
leaderboard collects cards from folders (``*.card.json``, and legacy evaluation JSONs written before
cards existed) or, through the command (:mod:`rdml.commands.leaderboard`, the MLflow edge), from the
``cards/`` artifacts of every run of an MLflow experiment, groups them by
threat model (data set, profile, suite digest), sorts each group by a metric in its robust direction
(:mod:`rdml.metrics`), and renders Markdown or HTML plus a robust-vs-clean scatter plot.

Numbers are shown in the display convention of the registry (fractions as percent, ERS in points);
a card without the sort metric sorts last.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdml.errors import ConfigError
from rdml.eval.cards import CARD_SUFFIX, card_from_evaluation, read_card

SORT_KEYS = ("ers", "worst.recall@1", "worst.map", "recall@1", "map")
"""Metrics a leaderboard can be sorted by (ERS by default; the worst case where the suite has it)."""


@dataclass
class Entry:
    """One card on the board: where it came from and the card itself."""

    source: str
    card: dict[str, Any]

    def value(self, key: str) -> dict[str, float | None] | None:
        """``{value, low, high}`` of ``key`` (ERS, a worst-case metric or a benign metric), or None."""
        card = self.card
        if key.startswith("ers"):
            return card.get("ers", {}).get(key)
        if key.startswith("worst."):
            return ((card.get("worst_case") or {}).get("metrics") or {}).get(key)
        return card.get("benign", {}).get(key)

    def group(self) -> tuple[str, str, str]:
        """Cards compare only within one threat model: data set, profile and the suite's digest."""
        card = self.card
        return (str(card["data"].get("name")), str(card["suite"].get("profile")), str(card["suite"].get("digest")))


def cards_in_folders(folders: Sequence[str | Path]) -> list[Entry]:
    """Every card under ``folders`` (recursively), plus legacy evaluation JSONs that have no card beside them."""
    entries: list[Entry] = []
    for folder in map(Path, folders):
        if not folder.exists():
            raise ConfigError(f"{folder} does not exist; pass a folder of robustness cards (rdml evaluate writes "
                              f"them to ./rdml-cards/ or beside --json as <stem>{CARD_SUFFIX})")
        files = [folder] if folder.is_file() else sorted(folder.rglob("*.json"))
        for path in files:
            if path.name.endswith(CARD_SUFFIX):
                entries.append(Entry(str(path), read_card(path)))
            elif not path.with_name(path.name.removesuffix(".json") + CARD_SUFFIX).exists():
                legacy = _legacy(path)
                if legacy is not None:
                    entries.append(Entry(str(path), legacy))
    return entries


def _legacy(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return card_from_evaluation(data, str(path)) if isinstance(data, dict) else None


def sorted_groups(entries: Iterable[Entry], key: str = "ers") -> dict[tuple[str, str, str], list[Entry]]:
    """Entries grouped by threat model, each group sorted best first in ``key``'s robust direction."""
    from rdml.metrics import HIGHER, lookup

    if key not in SORT_KEYS:
        raise ConfigError(f"cannot sort a leaderboard by {key!r}; choose one of {', '.join(SORT_KEYS)}")
    higher = lookup(key).good == HIGHER
    groups: dict[tuple[str, str, str], list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.group(), []).append(entry)

    def rank(entry: Entry) -> tuple[int, float]:
        v = (entry.value(key) or {}).get("value")
        if v is None or not math.isfinite(v):
            return (1, 0.0)
        return (0, -v if higher else v)

    return {g: sorted(members, key=rank) for g, members in sorted(groups.items())}


COLUMNS = (("recall@1", "clean R@1"), ("ers", "ERS"), ("worst.recall@1", "worst R@1"), ("worst.map", "worst mAP"))


def _cell(entry: Entry, key: str) -> str:
    from rdml.metrics import lookup

    v = entry.value(key)
    if not v or v.get("value") is None:
        return "-"
    spec = lookup(key)
    text = spec.show(v["value"])
    if v.get("low") is not None and v.get("high") is not None:
        text += f" [{spec.show(v['low'])}, {spec.show(v['high'])}]"
    return text


def rows(groups: dict[tuple[str, str, str], list[Entry]]) -> list[list[str]]:
    """Table rows: rank, model, data, profile, eps, queries, the metric columns, flags, run id."""
    out = []
    for (_data, _profile, _digest), members in groups.items():
        for i, e in enumerate(members, 1):
            c = e.card
            eps = c["threat_model"].get("eps_255")
            out.append([str(i), c["model"]["name"], str(c["data"].get("name") or "-"),
                        str(c["suite"].get("profile") or "-"), "-" if eps is None else f"{eps:g}/255",
                        str(c.get("queries", "-")), *(_cell(e, k) for k in (k for k, _ in COLUMNS)),
                        "; ".join(c.get("flags") or []) or "-", (c.get("mlflow") or {}).get("run_id") or "-"])
    return out


HEADER = ["#", "model", "data", "profile", "eps", "queries", *(title for _, title in COLUMNS), "flags", "MLflow run"]


def to_markdown(table: list[list[str]]) -> str:
    """The rows as a Markdown table (percent for fractions, points for ERS; 95% intervals in brackets)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
    return "\n".join(lines) + "\n"


def to_html(table: list[list[str]]) -> str:
    """The same table as a standalone HTML page."""
    from html import escape

    head = "".join(f"<th>{escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table)
    return (f"<!doctype html><meta charset='utf-8'><title>rdml leaderboard</title><table border='1'>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n")


def plot(groups: dict[tuple[str, str, str], list[Entry]], path: str | Path, robust: str = "ers") -> Path:
    """Robust metric (y) against clean R@1 (x), one marker per card, one colour per threat model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rdml.metrics import lookup

    spec_x, spec_y = lookup("recall@1"), lookup(robust)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (data, profile, _digest), members in groups.items():
        pts = [(e.value("recall@1"), e.value(robust), e.card["model"]["name"]) for e in members]
        pts = [(x["value"], y["value"], n) for x, y, n in pts if x and y and x.get("value") is not None
               and y.get("value") is not None]
        if not pts:
            continue
        xs = [float(spec_x.show(x)) for x, _, _ in pts]
        ys = [float(spec_y.show(y)) for _, y, _ in pts]
        ax.scatter(xs, ys, label=f"{data} / {profile}")
        for x, y, (_, _, name) in zip(xs, ys, pts, strict=True):
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"clean {spec_x.label}")
    ax.set_ylabel(spec_y.label)
    ax.set_title("rdml leaderboard: robust vs clean")
    ax.grid(alpha=0.3)
    if ax.collections:
        ax.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
