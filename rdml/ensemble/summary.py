"""Final robustness of every member and of the combined ensemble, and the table the command prints.

The numbers come from :func:`rdml.eval.robustness.evaluate_robustness` (one implementation of every
attack and metric); this module only chooses the profiles, runs them per model, and lays out rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rdml.config import ExperimentConfig


def default_profiles(cfg: ExperimentConfig, image_size: int) -> list[str]:
    """``eval.profile`` if set, else the quick ERS profile plus the clustering profile for the image size."""
    if cfg.eval.profile:
        return [p.strip() for p in cfg.eval.profile.split(",") if p.strip()]
    return ["quick", "clustering28" if image_size <= 64 else "clustering"]


def robustness_of(models: dict[str, Any], dataset, cfg: ExperimentConfig, profiles: Sequence[str],
                  device: str = "cpu", intervals: int = 1000, gallery=None, executor=None) -> dict[str, dict[str, float]]:
    """``{model name: {metric: value}}`` for every model under every profile (white-box, end to end),
    with bootstrap 95% intervals over the attacked queries (``ci.<key>.low/high``); ``executor``: attack
    workers to shard the attacks over (:mod:`rdml.eval.shards`)."""
    from rdml.eval.robustness import evaluate_robustness

    out: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        row: dict[str, float] = {}
        for profile in profiles:
            result = evaluate_robustness(model.eval(), dataset, profile, device=device, seed=cfg.eval.attack_seed,
                                         max_queries=cfg.eval.max_queries, batch_size=cfg.data.eval_batch_size,
                                         progress=False, intervals=intervals, gallery=gallery, executor=executor)
            row.update({k: float(v) for k, v in result.items()})
        out[name] = row
    return out


_CLEAN_ROWS = ("recall@1", "map@r", "nmi", "ari")


def table_rows(benign: dict[str, float], robust: dict[str, dict[str, float]], names: Sequence[str]
               ) -> list[tuple[str, list[str]]]:
    """Rows (metric, display cell per model) for the summary table: clean, ERS attacks, clustering attacks.

    Units and display come from the metric registry (:mod:`rdml.metrics`: fractions shown in %);
    attack numbers carry their bootstrap interval when the evaluation computed one.
    """
    from rdml.metrics import show, show_interval

    rows: list[tuple[str, list[str]]] = []
    for key in _CLEAN_ROWS:
        rows.append((f"clean {key}", [show(key, benign.get(f"{n}/{key}")) for n in names]))
    keys: list[str] = []
    for row in robust.values():
        for k in row:
            if k not in keys and (k.startswith("attacks.") or k == "ers"
                                  or (k.startswith("clustering.") and k.endswith((".nmi", ".recall@1")))):
                keys.append(k)
    for key in keys:
        rows.append((key, [show_interval(robust.get(n, {}), key) if key in robust.get(n, {}) else "—" for n in names]))
    return rows


def print_table(title: str, rows: list[tuple[str, list[str]]], names: Sequence[str]) -> None:
    """A rich table (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title + "  (fractions in %; brackets: bootstrap 95% intervals)")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    for label, cells in rows:
        table.add_row(label, *cells)
    Console(width=max(100, 22 + 22 * len(names))).print(table)
