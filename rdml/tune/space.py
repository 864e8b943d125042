"""Search spaces: YAML files (a path, or a shipped space by name) turned into Ray Tune parameter spaces.

The shipped spaces are the repository's ``tune_spaces/*.yaml``, installed as the data-only package
``rdml.tune_spaces`` and found with :mod:`importlib.resources`, so ``--space hm_schedules`` works the
same in a checkout, an editable install and a normal install (see :func:`shipped_spaces`).

A space file::

    name: hm_schedules
    base: digits                      # a recipe name, a YAML path (relative to the space file), or a mapping
    overrides: [defense.name=hm]      # dotted overrides applied to the base before sampling
    kind: train                       # train (one model per trial) | ensemble (EAT per trial)
    metric: recall@1                  # what ASHA stops on
    mode: max
    objectives: {recall@1: max, ers: max}   # optional: multi-objective -> Pareto front
    robustness: {profile: quick, max_queries: 16, every: 1}  # ERS per epoch (null: no attacks)
    num_samples: 8
    params:
      defense.hm_schedule: {choice: [lga, boost, constant]}
      defense.hm_u: {uniform: [0.1, 0.4]}
      defense.pgd.steps: {randint: [2, 9]}      # upper bound exclusive, as in tune.randint
      defense.hm_src: {grid: [random, softhard]} # every value, times num_samples
    scheduler: {asha: {max_t: 8, grace_period: 1, reduction_factor: 2}}
    resources: {cpu: 1, gpu: 0}
    max_failures: 1

Everything is validated on load: unknown top-level keys, unknown config keys (with the valid keys of
that section), malformed distributions, and every ``choice``/``grid`` value and both ends of every
range are checked against the config schema, so a typo fails in the driver, not in trial 17.
Conditional parameters (``hm_constant`` only matters for ``constant``) are simply always sampled:
the schedules that do not use them ignore them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rdml.config import ExperimentConfig, build_config, load_config
from rdml.errors import ConfigError

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")

#: metrics a trial reports (besides every benign metric of rdml.eval without the ``eval/`` prefix)
ROBUST_METRICS = ("ers",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ASHASpec(_Strict):
    max_t: int = Field(default=8, gt=0, description="epochs a trial may run at most")
    grace_period: int = Field(default=1, gt=0, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(default=2.0, gt=1)


class SchedulerSpec(_Strict):
    asha: ASHASpec | None = None


class RobustnessSpec(_Strict):
    profile: str = "quick"
    max_queries: int | None = Field(default=16, gt=0)
    every: int = Field(default=1, ge=1, description="epochs between robustness evaluations (the last always)")
    workers: int = Field(default=0, ge=0, description="Ray attack workers each trial shards its robustness "
                         "evaluation over (a CPU each, and a GPU when the trial has one), reserved with the trial "
                         "(rdml.eval.shards); 0: in the trial")


class ResourcesSpec(_Strict):
    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)

    @property
    def attack_workers_use_gpus(self) -> bool:
        """Whether a trial's attack workers each get a whole GPU: only when the trial itself has one."""
        return self.gpu >= 1


class SearchSpace(_Strict):
    """A validated search space (see the module doc for the file format)."""

    name: str
    description: str = ""
    base: str | dict[str, Any] = "digits"
    overrides: list[str] = Field(default_factory=list)
    kind: Literal["train", "ensemble"] = "train"
    metric: str = "recall@1"
    mode: Literal["max", "min"] = "max"
    objectives: dict[str, Literal["max", "min"]] = Field(default_factory=dict)
    robustness: RobustnessSpec | None = RobustnessSpec()
    num_samples: int = Field(default=4, gt=0)
    params: dict[str, dict[str, Any]]
    scheduler: SchedulerSpec = SchedulerSpec(asha=ASHASpec())
    resources: ResourcesSpec = ResourcesSpec()
    max_failures: int = Field(default=1, ge=0)
    source: str | None = None

    @field_validator("params")
    @classmethod
    def _check_distributions(cls, params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not params:
            raise ValueError("params must name at least one config key to search")
        for key, spec in params.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(
                    f"params.{key}: must be one mapping {{kind: values}} with kind one of {', '.join(DISTRIBUTIONS)}; "
                    f"got {spec!r}"
                )
            kind, values = next(iter(spec.items()))
            if kind in ("choice", "grid"):
                if not isinstance(values, list) or not values:
                    raise ValueError(f"params.{key}.{kind}: needs a non-empty list of values, got {values!r}")
            elif kind == "quniform":
                if not (isinstance(values, list) and len(values) == 3):
                    raise ValueError(f"params.{key}.quniform: needs [low, high, q], got {values!r}")
            else:
                if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) for v in values)):
                    raise ValueError(f"params.{key}.{kind}: needs [low, high] numbers, got {values!r}")
                if values[0] >= values[1]:
                    raise ValueError(f"params.{key}.{kind}: low must be < high, got {values!r}")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"params.{key}.loguniform: bounds must be > 0, got {values!r}")
        return params

    @property
    def all_objectives(self) -> dict[str, str]:
        """The objectives (default: the single ASHA metric)."""
        return dict(self.objectives) if self.objectives else {self.metric: self.mode}

    @property
    def max_epochs(self) -> int | None:
        return self.scheduler.asha.max_t if self.scheduler.asha else None

    def base_config(self, extra_overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
        """The base experiment config (before sampling): base + space overrides + CLI overrides."""
        overrides = [*self.overrides, *extra_overrides]
        if isinstance(self.base, dict):
            return build_config(self.base, overrides)
        base = self.base
        if self.source is not None and not Path(base).is_absolute():
            candidate = Path(self.source).parent / base
            if candidate.exists():
                base = str(candidate)
        return load_config(base, overrides)

    def sample_values(self) -> dict[str, list[Any]]:
        """Representative values per key (every choice/grid value, both ends of ranges) for validation."""
        out: dict[str, list[Any]] = {}
        for key, spec in self.params.items():
            kind, values = next(iter(spec.items()))
            if kind in ("choice", "grid"):
                out[key] = list(values)
            elif kind == "randint":
                out[key] = [int(values[0]), int(values[1]) - 1]
            else:
                out[key] = [values[0], values[1]]
        return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"]["c"] = value`` for ``key="a.b.c"`` (creating sections)."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def apply_params(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """``base`` with the sampled dotted ``params`` set (validated)."""
    data = base.to_dict()
    for key, value in params.items():
        set_dotted(data, key, value)
    return build_config(data)


def _section_keys(key: str) -> list[str]:
    """Valid keys next to ``key`` (for the error message)."""
    model: Any = ExperimentConfig
    parts = key.split(".")
    for part in parts[:-1]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return sorted(model.model_fields)
        model = field.annotation
    return sorted(model.model_fields)


def validate_space(space: SearchSpace, extra_overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Check every param key and value against the config schema; returns the base config."""
    where = space.source or space.name
    try:
        base = space.base_config(extra_overrides)
    except ConfigError as err:
        raise ConfigError(f"search space {where}: its base config is invalid: {err}") from None
    data = base.to_dict()
    for key, values in space.sample_values().items():
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(
                    f"search space {where}: params.{key}: {key!r} is not a config key; valid keys there: "
                    f"{', '.join(_section_keys(key))}"
                )
            node = node[part]
        for value in values:
            try:
                apply_params(base, {key: value})
            except ConfigError as err:
                detail = str(err).split("\n", 1)[-1].strip()
                raise ConfigError(f"search space {where}: params.{key}: value {value!r} is not allowed: {detail}") from None
    for name in space.all_objectives:
        if name in ROBUST_METRICS and space.robustness is None:
            raise ConfigError(
                f"search space {where}: objective {name!r} needs robustness evaluation; set robustness: {{profile: quick}}"
            )
    if space.kind == "ensemble" and base.defense.name == "none":
        pass  # EAT without a defense is a legal (if odd) baseline
    return base


#: the package the shipped spaces are installed as (pyproject.toml maps it to ``tune_spaces/``)
SHIPPED_PACKAGE = "rdml.tune_spaces"


def shipped_spaces() -> dict[str, Path]:
    """The shipped spaces by name (file stem), located inside the installed package, not the source tree."""
    try:
        root = resources.files(SHIPPED_PACKAGE)
    except ModuleNotFoundError:  # an editable install made before the spaces became package data
        raise ConfigError(
            f"the shipped search spaces ({SHIPPED_PACKAGE}) are not installed: reinstall rdml "
            "(pip install -e . in a checkout, or make venv)"
        ) from None
    # an installed or editable package lives on disk (pip does not install zipped), so the entry is a Path
    return {entry.name[: -len(".yaml")]: Path(str(entry)) for entry in root.iterdir()
            if entry.name.endswith(".yaml") and entry.is_file()}


def resolve_space(source: str | Path) -> Path:
    """The space file for ``source``: an existing YAML path, else a shipped space's name.

    ``tune_spaces/NAME.yaml`` also resolves to the shipped ``NAME`` when no such file is in the current
    directory, so the README's ``--space tune_spaces/hm_schedules.yaml`` works outside a checkout too.
    """
    path = Path(source)
    if path.is_file():
        return path
    name = str(source)
    if path.suffix == ".yaml" and str(path.parent) in (".", "tune_spaces"):
        name = path.stem
    shipped = shipped_spaces()
    if name in shipped:
        return shipped[name]
    raise ConfigError(
        f"search space {str(source)!r} not found: give a YAML path or the name of a shipped space "
        f"({', '.join(sorted(shipped))})"
    )


def load_space(source: str | Path, extra_overrides: list[str] | tuple[str, ...] = ()) -> tuple[SearchSpace, ExperimentConfig]:
    """Load and validate a space file (a path, or the name of a shipped space, see :func:`resolve_space`)."""
    path = resolve_space(source)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"search space {path}: the top level must be a mapping")
    data.setdefault("name", path.stem)
    data["source"] = str(path.resolve())
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as err:
        lines = [f"search space {path}: invalid:"]
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "<root>"
            if e["type"] == "extra_forbidden":
                lines.append(f"  {loc}: unknown key; allowed: {', '.join(sorted(SearchSpace.model_fields))}")
            else:
                lines.append(f"  {loc}: {e['msg']}")
        raise ConfigError("\n".join(lines)) from None
    base = validate_space(space, extra_overrides)
    return space, base


def to_param_space(space: SearchSpace) -> dict[str, Any]:
    """The Ray Tune ``param_space`` for the sampled keys (flat dotted keys under ``params``)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.params.items():
        kind, v = next(iter(spec.items()))
        if kind == "choice":
            out[key] = tune.choice(list(v))
        elif kind == "grid":
            out[key] = tune.grid_search(list(v))
        elif kind == "uniform":
            out[key] = tune.uniform(float(v[0]), float(v[1]))
        elif kind == "loguniform":
            out[key] = tune.loguniform(float(v[0]), float(v[1]))
        elif kind == "randint":
            out[key] = tune.randint(int(v[0]), int(v[1]))
        elif kind == "quniform":
            out[key] = tune.quniform(float(v[0]), float(v[1]), float(v[2]))
    return out
