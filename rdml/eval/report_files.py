"""The robustness report: the paper-style table, per-query Parquet, and plots, as files in a directory.

Input is the flat evaluation dict written by ``rdml evaluate --json`` (benign ``recall@1``... as
fractions, ``attacks.<name>``, ``ers``, ``clustering.<attack>.<metric>``, optionally
``curve.<metric>.eps=<eps>`` and ``masking.*``). Output (``write_report``):

* ``report.md`` and ``report.html``: benign R@1 / R@2 / mAP / NMI (%), the ten ERS attacks with their
  arrows (as in the paper's tables), ERS; further attacks and the clustering attacks in their own
  tables; flags for collapse (R@1 < 5%, whatever the ERS) and for suspected gradient masking;
* ``per_query.parquet`` when per-query results are given;
* ``robust_curve.png`` (metric vs eps) when curve keys are present, ``examples.png`` (clean vs
  adversarial queries with their top-k retrievals) when examples are given.

``write_models_report`` writes the same tables with one row per model, e.g. the members and the
combined embedding of an EAT run (``ensemble_report.json``, split by :func:`ensemble_report_models`).
The ``<stem>.examples.pt`` beside an evaluation JSON is read with ``torch.load(weights_only=True)``
(:mod:`rdml.safe_load`): a file holding anything but tensors and plain values is refused, never run.

The lead wires these files into MLflow; this module does not import mlflow.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rdml.attacks.ers import COLLAPSE_R1
from rdml.attacks.profiles import ERS_KEYS
from rdml.errors import ConfigError, RdmlError
from rdml.metrics import lookup, show, show_interval

BENIGN = (("recall@1", "R@1"), ("recall@2", "R@2"), ("map", "mAP"), ("nmi", "NMI"))
CURVE_KEY = re.compile(r"^curve\.(?P<metric>.+)\.eps=(?P<eps>[0-9.eE+-]+)$")
#: beside ERS: the two columns that separate robustness from the formula's artefacts (rdml.eval.robustness)
HONEST = ("ES:D/spread", "GTM|correct")


def _fmt(key: str, value: Any) -> str:
    """Paper-style display of a result (fractions as %), with units from the metric registry."""
    return show(key, value)


def _cell(metrics: Mapping[str, Any], key: str) -> str:
    return show_interval(metrics, key) if key in metrics else "—"


def flags(metrics: Mapping[str, Any]) -> list[str]:
    """Human-readable warnings: collapse next to ERS, suspected gradient masking."""
    out = []
    r1 = metrics.get("recall@1")
    if r1 is not None and r1 < COLLAPSE_R1:
        ers = metrics.get("ers")
        tail = f" its ERS ({ers:.1f}) is meaningless" if ers is not None else ""
        out.append(f"COLLAPSE: benign R@1 is {100 * r1:.1f}% (< {100 * COLLAPSE_R1:.0f}%);{tail}")
    elif metrics.get("collapse", 0.0) >= 1.0:
        spread = metrics.get("embedding_spread")
        detail = f"embedding spread {spread:.3f}" if spread is not None else "benign R@1 below 5%"
        out.append(f"COLLAPSE: {detail} on the attacked set (the embedding shrank to a point); the ERS is meaningless")
    if metrics.get("masking.flag", 0.0) >= 1.0:
        out.append("GRADIENT MASKING suspected: " + str(metrics.get("masking.reason", "stronger PGD did not hurt more")))
    return out


def _main_row(name: str, metrics: Mapping[str, Any]) -> list[str]:
    row = [name] + [_cell(metrics, k) for k, _ in BENIGN]
    row += [_fmt(f"attacks.{k}", metrics.get(f"attacks.{k}")) for k in ERS_KEYS]
    row += [_cell(metrics, f"attacks.{k}") for k in HONEST]
    ers = metrics.get("ers")
    ers_txt = _cell(metrics, "ers")
    r1 = metrics.get("recall@1")
    if ers is not None and ((r1 is not None and r1 < COLLAPSE_R1) or metrics.get("collapse", 0.0) >= 1.0):
        ers_txt += " (collapse)"
    return row + [ers_txt]


def model_tables(models: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The report's tables as (header, rows), one row (``main``, the paper layout) or column (``other``) per model."""
    out: dict[str, tuple[list[str], list[list[str]]]] = {}
    header = ["Model"] + [label for _, label in BENIGN] + [f"{k}{lookup('attacks.' + k).arrow}" for k in ERS_KEYS]
    header += [f"{k}{lookup('attacks.' + k).arrow}" for k in HONEST] + ["ERS↑"]
    out["main"] = (header, [_main_row(name, metrics) for name, metrics in models.items()])
    others: list[str] = []
    for metrics in models.values():
        others += [k[len("attacks."):] for k in metrics
                   if k.startswith("attacks.") and k[len("attacks."):] not in (*ERS_KEYS, *HONEST)]
    others = sorted(set(others))
    if others:
        cols = ["Value"] if len(models) == 1 else list(models)
        rows = [[k] + [_cell(m, f"attacks.{k}") for m in models.values()] for k in others]
        out["other"] = (["Attack", *cols], rows)
    cols = ["nmi", "ari", "cluster_acc", "cluster_f1", "recall@1"]
    rows = []
    for name, metrics in models.items():
        clus: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            if key.startswith("clustering."):
                attack, _, metric = key[len("clustering."):].rpartition(".")
                clus.setdefault(attack, {})[metric] = value
        order = ["clean"] + sorted(a for a in clus if a != "clean")
        prefix = [] if len(models) == 1 else [name]
        rows += [prefix + [a] + [_fmt(c, clus[a][c]) if c in clus[a] else "—" for c in cols]
                 for a in order if a in clus]
    if rows:
        prefix = [] if len(models) == 1 else ["Model"]
        out["clustering"] = ([*prefix, "Attack", "NMI", "ARI", "ACC", "F1", "R@1"], rows)
    return out


def model_flags(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """:func:`flags` of every model, prefixed with the model's name when there are several."""
    if len(models) == 1:
        return flags(next(iter(models.values())))
    return [f"{name}: {f}" for name, metrics in models.items() for f in flags(metrics)]


_TITLES = {"main": "Benign metrics (%) and the ERS attacks", "other": "Other attacks",
           "clustering": "Clustering attacks (%; clean vs attacked)"}


def to_markdown(metrics: Mapping[str, Any], name: str = "model") -> str:
    return models_markdown({name: metrics}, name)


def models_markdown(models: Mapping[str, Mapping[str, Any]], title: str) -> str:
    """The Markdown report of one or several models (one table row each)."""
    parts = [f"# Robustness report: {title}", ""]
    for f in model_flags(models):
        parts += [f"> **{f}**", ""]
    for key, (header, rows) in model_tables(models).items():
        parts += [f"## {_TITLES[key]}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        parts += ["| " + " | ".join(r) + " |" for r in rows]
        parts.append("")
    parts.append("CA/QA: rank percentiles (%); TMA: cosine; ES:D: embedding distance; ES:R/LTM/GTM: R@1 (%); "
                 "GTT: retain@4 (%); ES:D/spread: ES:D over the clean embedding's RMS pairwise distance; "
                 "GTM|correct: GTM on the queries retrieved correctly before the attack. Arrows: direction that "
                 "means robust. Brackets: bootstrap 95% intervals over the queries. rdml's GTM fixes the "
                 "reference code's target-index bug, which makes published GTM (and ERS) somewhat lower.")
    return "\n".join(parts) + "\n"


def to_html(metrics: Mapping[str, Any], name: str = "model", images: list[str] = ()) -> str:
    return models_html({name: metrics}, name, images)


def models_html(models: Mapping[str, Mapping[str, Any]], title: str, images: list[str] = ()) -> str:
    """The HTML report of one or several models (one table row each)."""
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>Robustness report: {esc(title)}</title>",
             "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;"
             "padding:3px 6px;text-align:right}.flag{color:#b00;font-weight:bold}</style></head><body>",
             f"<h1>Robustness report: {esc(title)}</h1>"]
    parts += [f"<p class='flag'>{esc(f)}</p>" for f in model_flags(models)]
    for _, (header, rows) in model_tables(models).items():
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table><br>")
    parts += [f"<p><img src='{esc(i)}' style='max-width:100%'></p>" for i in images]
    parts.append("</body></html>")
    return "\n".join(parts)


def curve_points(metrics: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """``curve.<metric>.eps=<eps>`` keys grouped per metric, sorted by eps."""
    out: dict[str, list[tuple[float, float]]] = {}
    for key, value in metrics.items():
        m = CURVE_KEY.match(key)
        if m:
            out.setdefault(m["metric"], []).append((float(m["eps"]), float(value)))
    return {k: sorted(v) for k, v in out.items()}


def plot_curve(metrics: Mapping[str, Any], path: Path) -> Path | None:
    """Robust metric vs eps (one line per curve metric); None if the dict has no curve."""
    points = curve_points(metrics)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for metric, pts in points.items():
        ax.plot([255 * e for e, _ in pts], [v for _, v in pts], marker="o", label=metric)
    ax.set_xlabel("eps (x/255)")
    ax.set_ylabel("robust metric (%)")
    ax.set_title("Robustness vs attack budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_examples(examples: Mapping[str, Any], path: Path, rows: int = 6) -> Path | None:
    """Clean vs adversarial queries with their top-k retrievals (green: same label, red: different)."""
    if not examples or "clean" not in examples:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(rows, len(examples["clean"]))
    k = examples["clean_topk"].shape[1]
    fig, axes = plt.subplots(2 * n, k + 1, figsize=(1.4 * (k + 1), 1.5 * 2 * n), squeeze=False)

    def show(ax, img, title="", color="black"):
        img = img.detach().cpu().float()
        ax.imshow(img.squeeze(0) if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=7, color=color)
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2)

    for i in range(n):
        label = int(examples["labels"][i])
        for j, kind in enumerate(("clean", "adv")):
            ax_row = axes[2 * i + j]
            show(ax_row[0], examples[kind][i], f"{kind} q (y={label})")
            for r in range(k):
                y = int(examples[f"{kind}_topk_labels"][i, r])
                show(ax_row[r + 1], examples[f"{kind}_topk_images"][i, r], f"#{r + 1} y={y}",
                     "green" if y == label else "red")
    fig.suptitle(f"attack {examples.get('attack', '')}: clean (top) vs adversarial (bottom) top-{k}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_examples(path: str | Path) -> Mapping[str, Any] | None:
    """The ``<stem>.examples.pt`` of ``rdml evaluate --json`` (None if absent), read without unpickling code."""
    from rdml.safe_load import load_torch_file

    path = Path(path)
    if not path.exists():
        return None
    fix = "pass the examples written by `rdml evaluate --json`, or delete the file to report without examples"
    examples = load_torch_file(path, what="examples file", fix=fix)
    if not isinstance(examples, dict):
        raise RdmlError(f"{path} is not an rdml examples file (no dict of tensors); {fix}")
    return examples


def write_report(metrics: Mapping[str, Any], out_dir: str | Path, *, name: str = "model",
                 per_query: str | Path | None = None, examples: Mapping[str, Any] | str | Path | None = None
                 ) -> dict[str, Path]:
    """Write the report files into ``out_dir``; returns {kind: path} of what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if isinstance(examples, (str, Path)):
        examples = load_examples(examples)
    if (p := plot_curve(metrics, out / "robust_curve.png")) is not None:
        written["curve"] = p
    if examples and (p := plot_examples(examples, out / "examples.png")) is not None:
        written["examples"] = p
    if per_query is not None and Path(per_query).exists():
        target = out / "per_query.parquet"
        if Path(per_query).resolve() != target.resolve():
            shutil.copyfile(per_query, target)
        written["per_query"] = target
    md = out / "report.md"
    md.write_text(to_markdown(metrics, name))
    written["markdown"] = md
    page = out / "report.html"
    page.write_text(to_html(metrics, name, [p.name for k, p in written.items() if k in ("curve", "examples")]))
    written["html"] = page
    summary = out / "metrics.json"
    summary.write_text(json.dumps(dict(metrics), indent=2, sort_keys=True, default=float))
    written["json"] = summary
    return written


def write_models_report(models: Mapping[str, Mapping[str, Any]], out_dir: str | Path, *, title: str
                        ) -> dict[str, Path]:
    """Report of several models side by side (``report.md``, ``report.html``, ``metrics.json`` per model)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "metrics.json"}
    written["markdown"].write_text(models_markdown(models, title))
    written["html"].write_text(models_html(models, title))
    written["json"].write_text(json.dumps({k: dict(v) for k, v in models.items()}, indent=2, sort_keys=True,
                                          default=float))
    return written


# ---------------------------------------------------------------------------------------- input formats
_EVAL_KEYS = ("recall@1", "recall@2", "map", "map@r", "nmi", "ers")
_MEMBER = re.compile(r"^member_(\d+)$")


def is_evaluation(data: Any) -> bool:
    """A flat evaluation dict (``rdml evaluate --json``): benign or attack metrics at the top level."""
    return isinstance(data, dict) and any(
        k in _EVAL_KEYS or str(k).startswith(("attacks.", "clustering.")) for k in data
    )


def is_ensemble_report(data: Any) -> bool:
    """The ``ensemble_report.json`` of ``rdml ensemble``: ``benign`` {model/metric} and ``robustness`` {model: {}}."""
    return (isinstance(data, dict) and isinstance(data.get("benign"), dict)
            and isinstance(data.get("robustness"), dict) and "steps" in data)


def ensemble_report_models(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat metrics per model of an ``ensemble_report.json``: member_0, member_1, ..., then ensemble."""
    models: dict[str, dict[str, Any]] = {}
    for key, value in report["benign"].items():
        name, _, metric = str(key).partition("/")
        if metric:
            models.setdefault(name, {})[metric] = value
    for name, row in report["robustness"].items():
        if isinstance(row, dict):
            models.setdefault(str(name), {}).update(row)

    def order(name: str) -> tuple[int, int, str]:
        m = _MEMBER.match(name)
        return (0, int(m.group(1)), "") if m else (1 if name == "ensemble" else 2, 0, name)

    return {name: models[name] for name in sorted(models, key=order)}


def report_models(data: Any, source: str | Path) -> dict[str, dict[str, Any]] | None:
    """{model: metrics} of an ensemble report, None for an evaluation JSON; ConfigError for anything else."""
    if is_ensemble_report(data):
        models = ensemble_report_models(data)
        if not models:
            raise ConfigError(f"{source} is an ensemble report without metrics (empty benign/robustness); "
                              "re-run `rdml ensemble` or evaluate its run directory with `rdml evaluate RUN_DIR`")
        return models
    if is_evaluation(data):
        return None
    kind = type(data).__name__ if not isinstance(data, dict) else "dict without any metric rdml writes"
    raise ConfigError(
        f"{source} is neither an evaluation JSON nor an ensemble report (it holds a {kind}); pass the file "
        "written by `rdml evaluate --json`, or the ensemble_report.json in a run directory of `rdml ensemble`"
    )
