"""Attack specs and attack profiles as data.

An *attack spec* is one attack with its budget, written either as a typed :class:`AttackSpec` or as
the RobRank-style string used on the command line, e.g. ``'QA:pm=-:M=1:eps=0.03137:alpha=0.011764:
pgditer=32'`` (``eps=8/255`` fractions are accepted). A *profile* is a named list of specs sharing a
default budget, shipped as YAML in ``rdml/attacks/profiles/`` (``rob28``, ``rob224``, ``pami28``, ...)
or read from any YAML file. Both parse into the same frozen objects, so ``rdml attack --attack`` and
``rdml evaluate --profile`` run exactly the same code. ``spec.build()`` and ``profile.build()`` give the
attack objects (:mod:`rdml.attacks.base`) that run them.
"""

from __future__ import annotations

from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rdml.attacks.pgd import Budget
from rdml.errors import ConfigError

AttackKind = Literal["CA", "QA", "SPQA", "TMA", "ES", "LTM", "GTM", "GTT", "PANUM", "CENTROID", "SHIFT"]

RANKING_KINDS = ("CA", "QA", "SPQA", "TMA", "ES", "LTM", "GTM", "GTT", "PANUM")
CLUSTERING_KINDS = ("CENTROID", "SHIFT")
ERS_KEYS = ("CA+", "CA-", "QA+", "QA-", "TMA", "ES:D", "ES:R", "LTM", "GTM", "GTT")

# spec-string key -> AttackSpec field (RobRank spells the step count ``pgditer``)
_ALIASES = {
    "pm": "pm", "W": "W", "M": "M", "eps": "eps", "alpha": "alpha", "pgditer": "steps", "steps": "steps",
    "norm": "norm", "rs": "random_start", "random_start": "random_start", "restarts": "restarts",
    "centroids": "centroids", "dynamic": "dynamic", "exclude_self": "exclude_self", "xi_k": "xi_k",
    "margin": "margin", "label": "label", "step": "step_rule", "step_rule": "step_rule",
}


class AttackSpec(BaseModel):
    """One attack: its kind, target-selection parameters and PGD budget (pixel units, [0,1] space)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: AttackKind
    pm: Literal["+", "-"] | None = Field(default=None, description="CA/QA/SPQA: raise (+) or lower (-)")
    W: int = Field(default=1, gt=0, description="CA: queries per candidate")
    M: int = Field(default=1, gt=0, description="QA/SPQA: targets per query")
    eps: float = Field(default=77 / 255, ge=0)
    alpha: float = Field(default=3 / 255, ge=0)
    steps: int = Field(default=32, ge=0)
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool = False
    restarts: int = Field(default=1, ge=1)
    step_rule: Literal["fixed", "apgd"] = Field(default="fixed", description="PGD steps of alpha, or APGD's "
                                                "adaptive step (alpha unused): docs/methods.md#apgd-step-rule")
    centroids: Literal["class", "kmeans"] = Field(default="class", description="CENTROID: label-aware or free")
    dynamic: bool = Field(default=False, description="CENTROID: recompute centroids after every step")
    margin: float | None = Field(default=None, gt=0, description="CENTROID: clip the centroid margin")
    exclude_self: bool = Field(default=True, description="PANUM: the query is not its own nearest positive")
    xi_k: float = Field(default=4e4, gt=0, description="SPQA: dynamic xi = min(exp(k * L_sp), 1e9)")
    label: str | None = Field(default=None, description="metric key; default derived from the spec")

    def model_post_init(self, _context: Any) -> None:
        if self.kind in ("CA", "QA", "SPQA") and self.pm is None:
            raise ValueError(f"attack {self.kind} needs pm=+ or pm=-")
        if self.kind not in ("CA", "QA", "SPQA") and self.pm is not None:
            raise ValueError(f"attack {self.kind} takes no pm")

    @property
    def threat(self) -> str:
        """``ranking`` (query or candidate perturbed, clean database) or ``clustering`` (all perturbed)."""
        return "clustering" if self.kind in CLUSTERING_KINDS else "ranking"

    @property
    def budget(self) -> Budget:
        """The PGD budget; one step is FGSM (a single step of size eps, RobRank's ``pgditer=1``)."""
        alpha = self.eps if self.steps == 1 else self.alpha
        return Budget(self.eps, alpha, self.steps, self.norm, self.random_start, self.restarts, self.step_rule)

    @property
    def base_name(self) -> str:
        """The short name: ``CA+``, ``QA-``, ``SPQA+``, ``TMA``, ``ES``, ``centroid_class_dynamic``..."""
        if self.kind in ("CA", "QA", "SPQA"):
            return f"{self.kind}{self.pm}"
        if self.kind == "CENTROID":
            return f"centroid_{self.centroids}" + ("_dynamic" if self.dynamic else "")
        if self.kind == "SHIFT":
            return "embedding_shift"
        return self.kind

    def metric_names(self) -> tuple[str, ...]:
        """Names of the reported numbers before any label suffix (ES reports two)."""
        if self.kind == "ES":
            return ("ES:D", "ES:R")
        if self.kind == "SPQA":
            return (self.base_name, f"{self.base_name}:GT")
        return (self.base_name,)

    def build(self, key: str | None = None):
        """The attack object of this spec (:mod:`rdml.attacks.ranking`, :mod:`rdml.attacks.clustering`)."""
        return build_attack(self, key)

    def to_string(self) -> str:
        """The canonical spec string; ``parse_attack_spec(spec.to_string()) == spec``."""
        parts = [self.kind]
        if self.pm is not None:
            parts.append(f"pm={self.pm}")
        if self.kind == "CA":
            parts.append(f"W={self.W}")
        if self.kind in ("QA", "SPQA"):
            parts.append(f"M={self.M}")
        parts += [f"eps={self.eps:.6g}", f"alpha={self.alpha:.6g}", f"pgditer={self.steps}"]
        if self.norm != "linf":
            parts.append(f"norm={self.norm}")
        if self.random_start:
            parts.append("rs=1")
        if self.restarts != 1:
            parts.append(f"restarts={self.restarts}")
        if self.step_rule != "fixed":
            parts.append(f"step={self.step_rule}")
        if self.kind == "CENTROID":
            parts.append(f"centroids={self.centroids}")
            if self.dynamic:
                parts.append("dynamic=1")
            if self.margin is not None:
                parts.append(f"margin={self.margin:.6g}")
        if self.kind == "PANUM" and not self.exclude_self:
            parts.append("exclude_self=0")
        if self.kind == "SPQA":
            parts.append(f"xi_k={self.xi_k:.6g}")
        if self.label is not None:
            parts.append(f"label={self.label}")
        return ":".join(parts)


def build_attack(spec: AttackSpec | str, key: str | None = None):
    """The attack object (ranking or clustering) of a spec or spec string; ``key`` names its metrics."""
    from rdml.attacks.clustering import CLUSTERING_ATTACKS
    from rdml.attacks.ranking import ATTACKS

    spec = parse_attack_spec(spec) if isinstance(spec, str) else spec
    cls = ATTACKS.get(spec.kind) or CLUSTERING_ATTACKS[spec.kind]
    return cls.from_spec(spec, key)


def _parse_number(raw: str) -> float:
    try:
        return float(Fraction(raw.strip()))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"attack spec value {raw!r} is not a number (use e.g. 0.03137 or 8/255)") from None


def _coerce(field: str, raw: str) -> Any:
    if field in ("eps", "alpha", "xi_k", "margin"):
        return _parse_number(raw)
    if field in ("W", "M", "steps", "restarts"):
        return int(_parse_number(raw))
    if field in ("random_start", "dynamic", "exclude_self"):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return raw.strip()


def parse_attack_spec(text: str, defaults: dict[str, Any] | None = None) -> AttackSpec:
    """Parse ``'KIND[:key=value]*'`` (RobRank grammar plus our keys) into an :class:`AttackSpec`.

    ``CA+``/``QA-`` are accepted as shorthand for ``CA:pm=+``. ``defaults`` (a profile's budget) fill
    the keys the string leaves out.
    """
    tokens = [t for t in text.strip().split(":") if t]
    if not tokens:
        raise ConfigError("empty attack spec; example: 'QA:pm=-:M=1:eps=8/255:alpha=3/255:pgditer=32'")
    head = tokens[0].strip().upper()
    values: dict[str, Any] = dict(defaults or {})
    if head[-1:] in "+-" and head[:-1] in ("CA", "QA", "SPQA"):
        head, values["pm"] = head[:-1], head[-1]
    values["kind"] = head
    for token in tokens[1:]:
        if "=" not in token:
            raise ConfigError(f"attack spec {text!r}: {token!r} must be key=value")
        key, raw = token.split("=", 1)
        field = _ALIASES.get(key.strip())
        if field is None:
            raise ConfigError(f"attack spec {text!r}: unknown key {key!r}; known keys: {', '.join(_ALIASES)}")
        values[field] = _coerce(field, raw)
    if head not in RANKING_KINDS + CLUSTERING_KINDS:
        raise ConfigError(
            f"attack spec {text!r}: unknown attack {head!r}; known: {', '.join(RANKING_KINDS + CLUSTERING_KINDS)}"
        )
    if head not in ("CA", "QA", "SPQA"):
        values.pop("pm", None)
    try:
        return AttackSpec.model_validate(values)
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"attack spec {text!r} is invalid: {msgs}") from None


class BlackBoxSettings(BaseModel):
    """The query-only random search of a worst-case suite (:mod:`rdml.attacks.blackbox`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queries: int = Field(default=1000, ge=0, description="model queries per attacked item (0: no black-box check)")
    p_init: float = Field(default=0.8, gt=0, le=1, description="Square's initial fraction of pixels per square")
    eps: float = Field(default=77 / 255, ge=0, description="L-inf radius (default: the profile's budget)")


class WorstCaseSettings(BaseModel):
    """What a worst-case suite adds to its white-box attacks (:mod:`rdml.attacks.worst_case`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(default=1, ge=1, description="the suite's version, recorded in every robustness card")
    blackbox: BlackBoxSettings = BlackBoxSettings()
    transfer: tuple[AttackSpec, ...] = Field(default=(), description="attacks crafted on a surrogate model")


class AttackProfile(BaseModel):
    """A named set of attacks run together (``ers=True``: the 10 ERS numbers and the score).

    ``worst_case`` (the ``worst28``/``worst224`` suites): also judge every attacked item by the ranking
    metrics of its worst case over the suite, with the black-box and transfer checks.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    ers: bool = False
    max_queries: int | None = Field(default=None, gt=0, description="attack at most N queries (speed)")
    attacks: tuple[AttackSpec, ...]
    worst_case: WorstCaseSettings | None = None

    def keyed(self) -> list[tuple[str, AttackSpec]]:
        """(metric-key prefix, spec) pairs with keys unique inside the profile.

        The key is the spec's ``label`` or its short name; when the short name repeats (``pami224``
        runs CA+ at two budgets and four W) the differing parameters are appended, e.g.
        ``CA+:W=2:eps=0.00784``.
        """
        counts: dict[str, int] = {}
        for spec in self.attacks:
            if spec.label is None:
                counts[spec.base_name] = counts.get(spec.base_name, 0) + 1
        keyed = []
        for spec in self.attacks:
            key = spec.label or spec.base_name
            if spec.label is None and counts[spec.base_name] > 1:
                if spec.kind == "CA":
                    key += f":W={spec.W}"
                if spec.kind in ("QA", "SPQA"):
                    key += f":M={spec.M}"
                key += f":eps={spec.eps:.3g}"
            keyed.append((key, spec))
        if len({k for k, _ in keyed}) != len(keyed):
            raise ConfigError(f"profile {self.name}: two attacks share a key; give them distinct `label`s")
        return keyed

    def build(self) -> list:
        """The profile's attack objects, in order, each carrying its unique metric key (``attack.key``)."""
        return [build_attack(spec, key) for key, spec in self.keyed()]


def profile_names() -> list[str]:
    """Names of the profiles shipped in ``rdml/attacks/profiles``."""
    root = resources.files("rdml.attacks").joinpath("profiles")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def profile_from_dict(data: dict[str, Any], source: str = "<dict>") -> AttackProfile:
    """Build a profile from its YAML mapping: ``budget`` defaults + ``attacks`` (spec strings or maps)."""
    if not isinstance(data, dict):
        raise ConfigError(f"profile {source}: the top level must be a mapping")
    data = dict(data)
    budget = data.pop("budget", {}) or {}
    defaults: dict[str, Any] = {}
    for key, raw in budget.items():
        field = _ALIASES.get(key)
        if field is None:
            raise ConfigError(f"profile {source}: unknown budget key {key!r}; known: eps, alpha, steps, norm, rs, restarts")
        defaults[field] = _coerce(field, str(raw))
    specs = []
    for entry in data.pop("attacks", None) or []:
        if isinstance(entry, AttackSpec):
            specs.append(entry)
        elif isinstance(entry, str):
            specs.append(parse_attack_spec(entry, defaults))
        elif isinstance(entry, dict):
            text = ":".join([str(entry.get("kind", ""))] + [f"{k}={v}" for k, v in entry.items() if k != "kind"])
            specs.append(parse_attack_spec(text, defaults))
        else:
            raise ConfigError(f"profile {source}: attack entries are spec strings or mappings, got {entry!r}")
    if not specs:
        raise ConfigError(f"profile {source}: `attacks` is empty")
    worst = data.pop("worst_case", None)
    if worst is not None:  # transfer specs take the profile's budget too; the black-box its eps
        if not isinstance(worst, dict):
            raise ConfigError(f"profile {source}: `worst_case` must be a mapping (version, blackbox, transfer)")
        worst = dict(worst)
        worst["transfer"] = tuple(parse_attack_spec(str(t), defaults) for t in worst.get("transfer") or ())
        blackbox = {k: _parse_number(str(v)) if k in ("eps", "p_init") else v
                    for k, v in (worst.get("blackbox") or {}).items()}
        worst["blackbox"] = {"eps": defaults.get("eps", 77 / 255), **blackbox}
        data["worst_case"] = worst
    data.setdefault("name", Path(source).stem)
    try:
        return AttackProfile.model_validate({**data, "attacks": tuple(specs)})
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"profile {source} is invalid: {msgs}") from None


def load_profile(source: str | Path | AttackProfile) -> AttackProfile:
    """A shipped profile by name (``rob28``...), a YAML file path, or an :class:`AttackProfile` as is."""
    if isinstance(source, AttackProfile):
        return source
    path = Path(source)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text, name = path.read_text(), str(path)
    else:
        shipped = resources.files("rdml.attacks").joinpath("profiles").joinpath(f"{source}.yaml")
        if not shipped.is_file():
            raise ConfigError(
                f"attack profile {str(source)!r} is neither a YAML file nor a shipped profile; "
                f"shipped: {', '.join(profile_names())}"
            )
        text, name = shipped.read_text(), f"{source}.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"profile {name}: not valid YAML: {exc}") from None
    return profile_from_dict(data, name)


def single_attack_profile(spec: AttackSpec | str, max_queries: int | None = None) -> AttackProfile:
    """Wrap one spec (or spec string) as a profile, for ``rdml attack``."""
    spec = parse_attack_spec(spec) if isinstance(spec, str) else spec
    return AttackProfile(name=spec.base_name, attacks=(spec,), max_queries=max_queries)
