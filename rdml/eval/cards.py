"""Robustness cards: one JSON record per evaluation, with a documented, versioned schema.

Why: a robustness number means little without what produced it (the threat model, the suite and its
version, how many queries, which seeds) and what was checked next to it (intervals, flags). RobustBench
keeps one record per model and threat model for classification; a card is that record for retrieval.
Every evaluation makes one (:func:`rdml.evaluate` keeps it in ``run.info["card"]`` and writes it with
``card=PATH``; ``rdml evaluate`` writes it beside its JSON, or to ``--card``, and logs it to MLflow as
``cards/<file>`` when tracking), and ``rdml leaderboard`` (:mod:`rdml.eval.leaderboard`) collects them.

The schema is the pydantic model :class:`Card` (``Card.model_json_schema()`` is the JSON Schema;
docs/api.md#robustness-cards lists the fields). ``schema`` names it, ``version`` is
:data:`CARD_VERSION`; a reader refuses a card of a newer version instead of misreading it. Units are
rdml's (:mod:`rdml.metrics`): fractions, cosines, distances, ERS in points; never percent.

Version history: 1 (first version).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rdml.errors import ConfigError

CARD_SCHEMA = "rdml.robustness-card"
CARD_VERSION = 1
CARD_SUFFIX = ".card.json"
"""Card files end in this; ``rdml leaderboard DIR`` reads every such file under DIR."""

ARTIFACT_DIR = "cards"
"""The MLflow artifact directory of a run's cards (``rdml leaderboard --experiment`` reads it)."""

BENIGN_KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "map", "map@r", "nmi", "ari", "cluster_acc",
               "cluster_f1")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Value(_Record):
    """A number with its bootstrap 95% interval (``low``/``high`` None when there is none), in rdml's units."""

    value: float | None
    low: float | None = None
    high: float | None = None


class ModelInfo(_Record):
    """What was evaluated: a name, and whatever is known of its origin."""

    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    checkpoint: str | None = Field(default=None, description="the path that was evaluated, if any")
    class_name: str | None = Field(default=None, description="the evaluated nn.Module's class")
    config_name: str | None = None
    defense: str | None = None
    arch: str | None = None
    embedding_dim: int | None = None


class DataInfo(_Record):
    """The data the model was evaluated on, and the retrieval protocol."""

    name: str | None = Field(description="data set name (None: tensors handed to the API)")
    split: str | None = None
    protocol: Literal["self-query", "query-gallery"]
    queries: int = Field(description="size of the query set")
    gallery: int | None = Field(default=None, description="size of the separate gallery (None: self-query)")


class ThreatModel(_Record):
    """The attacker: what it perturbs and within which ball (pixel units of [0, 1] images)."""

    setting: Literal["ranking", "clustering", "ranking+clustering", "none"]
    perturbs: str = Field(description="what the attacker changes, in words")
    norm: Literal["linf", "l2"] | None = None
    eps: float | None = Field(default=None, description="the suite's main radius (most attacks use it)")
    eps_255: float | None = Field(default=None, description="eps in 8-bit grey levels (eps x 255)")
    eps_values: list[float] = Field(default_factory=list, description="every radius an attack of the suite uses")


class SuiteInfo(_Record):
    """The attack suite: profile name, its version and a digest of its exact attacks."""

    profile: str | None
    version: int | None = Field(default=None, description="worst-case suites: worst_case.version; else 1")
    digest: str | None = Field(default=None, description="sha256 (12 hex) of the profile's canonical JSON")
    ers: bool = False
    worst_case: bool = False
    attacks: list[str] = Field(default_factory=list, description="canonical spec strings, in order")
    max_queries: int | None = None


class AttackEntry(_Record):
    """One attack of the suite: its key, spec, reported numbers (with intervals) and cost."""

    key: str
    spec: str
    metrics: dict[str, Value]
    passes: int | None = None
    seconds: float | None = None


class WorstCaseInfo(_Record):
    """The worst case over the suite (rdml.eval.worst_case): means, per group and per member, and the check."""

    metrics: dict[str, Value] = Field(description="worst.* means with intervals (recall@1, map, rank, per group)")
    by_attack: dict[str, dict[str, float | str | None]] = Field(default_factory=dict)
    masking: bool = Field(description="a black-box or transfer attack beat the white-box ones")
    reasons: list[str] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict, description="checks that did not run, and why")


class Seeds(_Record):
    """Every seed the numbers depend on."""

    attack: int | None = Field(description="target sampling, PGD starts, black-box search, query subset, bootstrap")
    kmeans: int | None = None
    train: int | None = Field(default=None, description="the training run's seed (rdml-trained models)")
    bootstrap_resamples: int | None = None


class MlflowInfo(_Record):
    run_id: str | None = None
    experiment: str | None = None
    tracking_uri: str | None = None


class Card(BaseModel):
    """A robustness card (schema :data:`CARD_SCHEMA`, version :data:`CARD_VERSION`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    card_schema: Literal["rdml.robustness-card"] = Field(default=CARD_SCHEMA, alias="schema")
    version: int = CARD_VERSION
    created: str = Field(description="ISO-8601 UTC time the card was made")
    rdml_version: str
    model: ModelInfo
    data: DataInfo
    threat_model: ThreatModel
    suite: SuiteInfo
    queries: int = Field(description="number of attacked queries (0: benign metrics only)")
    seeds: Seeds
    benign: dict[str, Value]
    attacks: list[AttackEntry] = Field(default_factory=list)
    ers: dict[str, Value] = Field(default_factory=dict, description="ers and every group's ers.<prefix>, points")
    worst_case: WorstCaseInfo | None = None
    intervals: dict[str, float] = Field(default_factory=dict, description="every ci.<key>.low/high of the evaluation")
    flags: list[str] = Field(default_factory=list, description="warnings in words (collapse, masking, ES:D-driven)")
    metrics: dict[str, float | str] = Field(default_factory=dict, description="the evaluation's flat metrics")
    mlflow: MlflowInfo | None = None
    legacy: bool = Field(default=False, description="rebuilt from an evaluation JSON made before cards existed")


def json_schema() -> dict[str, Any]:
    """The card's JSON Schema (for tools outside rdml)."""
    return Card.model_json_schema(by_alias=True)


# ---- building a card ------------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _value(metrics: Mapping[str, Any], key: str) -> Value:
    return Value(value=_num(metrics.get(key)), low=_num(metrics.get(f"ci.{key}.low")),
                 high=_num(metrics.get(f"ci.{key}.high")))


def profile_digest(profile: Any) -> str:
    """sha256 (first 12 hex) of a profile's canonical JSON: two cards with equal digests ran the same attacks."""
    data = json.dumps(profile.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()[:12]


def threat_model(profile: Any) -> ThreatModel:
    """The suite's attacker: setting, norm and main eps (the eps most attacks use)."""
    if profile is None:
        return ThreatModel(setting="none", perturbs="nothing (benign metrics only)")
    specs = list(profile.attacks)
    threats = sorted({s.threat for s in specs})
    setting = "+".join(threats) if threats else "none"
    eps_counts = Counter(round(s.eps, 8) for s in specs)
    eps = eps_counts.most_common(1)[0][0] if eps_counts else None
    norms = Counter(s.norm for s in specs)
    perturbs = {"ranking": "the query (CA: the candidate) within the ball; the gallery stays clean",
                "clustering": "every sample of the clustered set within the ball",
                "clustering+ranking": "the query or candidate (ranking attacks); every sample (clustering attacks)"}
    return ThreatModel(setting=setting.replace("clustering+ranking", "ranking+clustering"),  # type: ignore[arg-type]
                       perturbs=perturbs.get(setting, "nothing"), norm=norms.most_common(1)[0][0] if norms else None,
                       eps=eps, eps_255=None if eps is None else round(eps * 255, 4),
                       eps_values=sorted(eps_counts))


def suite_info(profile: Any) -> SuiteInfo:
    if profile is None:
        return SuiteInfo(profile=None)
    worst = getattr(profile, "worst_case", None)
    return SuiteInfo(profile=profile.name, version=worst.version if worst is not None else 1,
                     digest=profile_digest(profile), ers=profile.ers, worst_case=worst is not None,
                     attacks=[s.to_string() for s in profile.attacks], max_queries=profile.max_queries)


def _attack_entries(metrics: Mapping[str, Any], rob: Any, profile: Any) -> list[AttackEntry]:
    if profile is None:
        return []
    outcomes = {o.key: o for o in getattr(rob, "outcomes", [])} if rob is not None else {}
    clustering = {o.key: o for o in getattr(rob, "clustering", [])} if rob is not None else {}
    entries = []
    for key, spec in profile.keyed():
        if spec.threat == "ranking":
            names = [f"attacks.{key}{m[len(spec.base_name):]}" for m in spec.metric_names()]
            names += [n + extra for n in names for extra in ("/spread", "|correct") if f"{n}{extra}" in metrics]
            source = outcomes.get(key)
        else:
            names = sorted(k for k in metrics if k.startswith(f"clustering.{key}.") and not k.startswith("ci."))
            source = clustering.get(key)
        entries.append(AttackEntry(key=key, spec=spec.to_string(),
                                   metrics={n: _value(metrics, n) for n in names if n in metrics},
                                   passes=getattr(source, "passes", None),
                                   seconds=_num(getattr(source, "seconds", None))))
    return entries


def _worst_info(metrics: Mapping[str, Any], rob: Any) -> WorstCaseInfo | None:
    keys = [k for k in metrics if k.startswith("worst.") and k != "worst.masking"]
    if not keys:
        return None
    wc = getattr(rob, "worst", None) if rob is not None else None
    by_attack = {}
    if wc is not None:
        by_attack = {k: {m: (_num(v) if not isinstance(v, str) else v) for m, v in row.items()}
                     for k, row in wc.by_attack().items()}
    return WorstCaseInfo(metrics={k: _value(metrics, k) for k in keys}, by_attack=by_attack,
                         masking=bool(metrics.get("worst.masking", 0.0)),
                         reasons=list(getattr(wc, "reasons", []) or []), skipped=dict(getattr(wc, "skipped", {}) or {}))


def build_card(metrics: Mapping[str, Any], *, profile: Any, model: Mapping[str, Any], data: Mapping[str, Any],
               seeds: Mapping[str, Any], flags: list[str] | None = None, robustness: Any = None,
               queries: int | None = None, mlflow: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The card (a JSON-ready dict, validated against :class:`Card`) of one evaluation.

    ``metrics`` is the evaluation's flat dict (``run.metrics``), ``profile`` its
    :class:`~rdml.attacks.profiles.AttackProfile` (None: benign only), ``robustness`` the
    :class:`~rdml.eval.robustness.RobustnessResult` (per-attack cost, worst-case members); ``model``,
    ``data``, ``seeds`` and ``mlflow`` the fields of :class:`ModelInfo`, :class:`DataInfo`,
    :class:`Seeds` and :class:`MlflowInfo`.
    """
    from rdml import __version__

    if queries is None:
        queries = len(getattr(robustness, "indices", ())) if robustness is not None else 0
    numeric = {k: v for k, v in metrics.items() if _num(v) is not None or isinstance(v, str)}
    card = Card(
        created=datetime.now(UTC).isoformat(timespec="seconds"), rdml_version=__version__,
        model=ModelInfo(**{k: v for k, v in model.items() if v is not None}), data=DataInfo(**data),
        threat_model=threat_model(profile), suite=suite_info(profile), queries=int(queries), seeds=Seeds(**seeds),
        benign={k: _value(metrics, k) for k in BENIGN_KEYS if k in metrics},
        attacks=_attack_entries(metrics, robustness, profile),
        ers={k: _value(metrics, k) for k in metrics if k == "ers" or (k.startswith("ers.") and not k.startswith("ci."))},
        worst_case=_worst_info(metrics, robustness),
        intervals={k: float(v) for k, v in metrics.items() if k.startswith("ci.") and _num(v) is not None},
        flags=list(flags or []),
        metrics={k: (float(v) if not isinstance(v, str) else v) for k, v in numeric.items()},
        mlflow=MlflowInfo(**mlflow) if mlflow else None,
    )
    return card.model_dump(mode="json", by_alias=True)


def describe_data(query_set: Any, gallery_set: Any) -> dict[str, Any]:
    """The :class:`DataInfo` fields of a query set and optional gallery (rdml datasets or wrapped tensors)."""
    return {"name": getattr(query_set, "name", None), "split": getattr(query_set, "split", None),
            "protocol": "self-query" if gallery_set is None else "query-gallery", "queries": len(query_set),
            "gallery": None if gallery_set is None else len(gallery_set)}


# ---- reading and writing ----------------------------------------------------------------------------------


def validate_card(data: Any, source: str = "card") -> dict[str, Any]:
    """``data`` checked against the schema (a newer version or another schema is refused, naming the fix)."""
    if not isinstance(data, dict) or data.get("schema") != CARD_SCHEMA:
        raise ConfigError(f"{source} is not a robustness card (its 'schema' is not {CARD_SCHEMA!r}); cards are "
                          f"written by rdml evaluate (<json stem>{CARD_SUFFIX}, or --card PATH)")
    version = data.get("version")
    if not isinstance(version, int) or version > CARD_VERSION:
        raise ConfigError(f"{source} is a version-{version} card; this rdml reads up to version {CARD_VERSION}: "
                          "upgrade rdml to read it")
    try:
        return Card.model_validate(data).model_dump(mode="json", by_alias=True)
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5])
        raise ConfigError(f"{source} does not follow the card schema v{version}: {msgs}") from None


def write_card(card: Mapping[str, Any], path: str | Path) -> Path:
    """Write a card (validated) as indented JSON; returns the path."""
    path = Path(path)
    checked = validate_card(dict(card), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(checked, indent=2, sort_keys=False) + "\n")
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    """A card file, validated (:class:`ConfigError` naming the file when it is not one)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the card {path}: {exc}") from None
    return validate_card(data, str(path))


def card_path(json_out: str | Path) -> Path:
    """Where ``rdml evaluate --json OUT`` puts the card: ``<OUT stem>.card.json`` beside it."""
    out = Path(json_out)
    return out.with_name(out.stem + CARD_SUFFIX)


def card_from_evaluation(data: Mapping[str, Any], source: str, run_id: str | None = None) -> dict[str, Any] | None:
    """A legacy card from a saved :class:`rdml.eval.compare.RunEvaluation` JSON (``{name, seed, metrics}``).

    Evaluations made before cards existed (e.g. the benchmark runs' ``<model>.rob28.json`` artifacts) hold
    the flat metrics but not the suite or the data set; the profile is read from the file name
    (``<name>.<profile>.json``) and the card is marked ``legacy``. None when ``data`` is no such file.
    """
    metrics = data.get("metrics") if isinstance(data, Mapping) else None
    if not isinstance(metrics, Mapping) or "recall@1" not in metrics:
        return None
    stem = Path(source).name.removesuffix(".json")
    profile_name = str(metrics.get("profile") or (stem.split(".", 1)[1] if "." in stem else "")) or None
    profile = None
    if profile_name:
        from rdml.attacks.profiles import load_profile

        try:
            profile = load_profile(profile_name)
        except ConfigError:
            profile = None
    attacked = any(k.startswith(("attacks.", "clustering.")) for k in metrics)
    card = build_card(metrics, profile=profile if attacked else None,
                      model={"name": str(data.get("name") or stem), "description": f"from {source}"},
                      data={"name": None, "protocol": "self-query", "queries": 0},
                      seeds={"attack": None, "train": data.get("seed")}, flags=_legacy_flags(metrics),
                      queries=0, mlflow={"run_id": run_id} if run_id else None)
    card["legacy"] = True
    if profile is None and profile_name:
        card["suite"]["profile"] = profile_name
    return card


def _legacy_flags(metrics: Mapping[str, Any]) -> list[str]:
    from rdml.eval.report_files import flags

    return flags(metrics)
