"""Typed, validated experiment configuration.

A config is data: it is loaded from YAML (a file path or the name of a shipped recipe in
``rdml/recipes``), changed with dotted ``--set a.b=c`` overrides, validated in full before any work
starts, logged to MLflow and stored in every checkpoint, so that a checkpoint alone is enough to
evaluate or resume. Unknown keys and out-of-range values are rejected with the key path and the
allowed values (:class:`rdml.errors.ConfigError`): sizes, counts and epochs must be >= 1, seeds >= 0,
floats finite; pixel budgets (``defense.pgd.eps``/``alpha``) are in [0,1] pixel units and may be
written as fractions of the 8-bit range (``8/255``).
"""

from __future__ import annotations

import math
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rdml.errors import ConfigError


def registry_values(registry: str) -> tuple[str, ...]:
    """The allowed values of a config field, read from the code that implements them.

    The registries are the single source: adding a data set, sampler, schedule, defense, loss,
    backbone, split or self-transfer mode there makes the config accept it, with no list to keep in
    sync here. They are imported lazily, at validation time, because they import this module.
    """
    if registry == "datasets":
        from rdml.data.readers import READERS

        return tuple(READERS)
    if registry == "samplers":
        from rdml.losses.miners import SAMPLERS

        return SAMPLERS
    if registry == "schedules":
        from rdml.defenses.schedules import SCHEDULES

        return SCHEDULES
    if registry == "defenses":
        from rdml.defenses import DEFENSES

        return tuple(DEFENSES)
    if registry == "losses":
        from rdml.losses.factory import LOSSES

        return LOSSES
    if registry == "archs":
        from rdml.models.factory import ARCHS

        return ARCHS
    if registry == "ensemble_splits":
        from rdml.ensemble.parts import SPLIT_MODES

        return SPLIT_MODES
    if registry == "self_transfer":
        from rdml.ensemble.transfer import SELF_TRANSFER

        return tuple(SELF_TRANSFER)
    if registry == "combine":
        from rdml.ensemble.combine import COMBINE_MODES

        return COMBINE_MODES
    raise KeyError(registry)


def _member_of(registry: str):
    def check(value: str) -> str:
        allowed = registry_values(registry)
        if value not in allowed:
            raise ValueError(f"unknown value {value!r}; choose one of {', '.join(map(repr, allowed))}")
        return value

    return AfterValidator(check)


DatasetName = Annotated[str, _member_of("datasets")]
SamplerName = Annotated[str, _member_of("samplers")]
ScheduleName = Annotated[str, _member_of("schedules")]
DefenseName = Annotated[str, _member_of("defenses")]
LossName = Annotated[str, _member_of("losses")]
ArchName = Annotated[str, _member_of("archs")]


class _Section(BaseModel):
    """Strict base: unknown keys are errors, values are validated on assignment too."""

    # inf/nan are never meaningful here (an lr of inf passes "> 0"): refuse them everywhere
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


class DataConfig(_Section):
    """Which dataset, where it lives, and how batches are formed."""

    name: DatasetName = "digits"
    split: Literal["default", "same_classes", "zero_shot"] = Field(
        default="default",
        description="default: the data set's own protocol; same_classes: test on the training classes (robrank's "
        "28x28 protocol; digits, mnist5k); zero_shot: unseen test classes (digits, mnist5k: 0-4 train, 5-9 test)",
    )
    root: Path | None = Field(
        default=None, description="dataset directory; default $RDML_DATA/<name> or ~/.rdml/data/<name>"
    )
    image_size: int | None = Field(default=None, gt=0, description="None: 28 for 28x28 sets, 224 otherwise")
    batch_pairs: int = Field(default=32, gt=0, description="SPC-2 pairs per batch: 2*batch_pairs images")
    batch_sampler: Literal["pairs", "m_per_class"] = "pairs"
    m_per_class: int = Field(default=2, ge=2)
    eval_batch_size: int = Field(default=256, gt=0)
    num_workers: int = Field(default=0, ge=0)
    train_classes: list[str] | None = Field(default=None, min_length=1, description="folder dataset: training classes")
    test_classes: list[str] | None = Field(default=None, min_length=1, description="folder dataset: test classes")
    limit_train: int | None = Field(default=None, gt=0, description="use a fixed seeded subset of N training images")
    limit_test: int | None = Field(default=None, gt=0, description="use a fixed seeded subset of N test images")
    manifest_dir: Path | None = Field(default=None, description="where Parquet manifests go; default <root>")


class ModelConfig(_Section):
    """Backbone and embedding head. Inputs are [0,1] pixels; normalisation happens inside forward."""

    arch: ArchName = "c2f2"
    embedding_dim: int = Field(default=512, gt=0)
    pretrained: Path | None = Field(default=None, description="local torchvision state_dict for the backbone")
    freeze_bn: bool | None = Field(default=None, description="None: frozen for ResNets, n/a for c2f2")


class LossConfig(_Section):
    """The metric-learning loss and its in-batch triplet sampler."""

    name: LossName = "triplet"
    sampler: SamplerName = "random"
    margin: float = Field(default=0.2, ge=0, description="triplet margin gamma on the normalised metric")
    pos_margin: float = Field(default=0.0, ge=0, description="contrastive positive margin")
    neg_margin: float = Field(default=1.0, ge=0, description="contrastive negative margin")
    proxy_margin: float = Field(default=0.1, ge=0, description="proxy-anchor delta")
    proxy_alpha: float = Field(default=32.0, gt=0, description="proxy-anchor scale")
    proxy_lr_multiplier: float = Field(default=100.0, gt=0)


def parse_fraction(value: Any) -> Any:
    """``"8/255"`` -> 0.0313...: budgets are written as fractions of the 8-bit pixel range everywhere."""
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            return value  # pydantic then reports "not a valid number" with the key path
    return value


class PGDConfig(_Section):
    """A training-time PGD budget: ball, step, iterations. eps and alpha are in [0,1] pixel units.

    The default is robrank's 28x28 training budget (eps 77/255, alpha 3/255, 32 steps), which can reach
    the whole ball (32 x 3/255 = 96/255 >= 77/255). ``alpha: auto`` picks 2.5 eps / steps. One step is
    FGSM: a single step of size eps (alpha is not used).
    """

    eps: float = Field(default=77 / 255, ge=0, description="radius of the ball (L-inf: at most 1)")
    alpha: float | Literal["auto"] = Field(default=3 / 255, description="step size, or auto = 2.5 eps / steps")
    steps: int = Field(default=32, ge=0)
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool = False
    partial_reach: bool = Field(
        default=False,
        description="allow steps x alpha < eps (the attack cannot reach the ball's boundary); for ablations only",
    )

    _fractions = field_validator("eps", "alpha", mode="before")(parse_fraction)

    @field_validator("alpha")
    @classmethod
    def _alpha_positive(cls, value: float | str) -> float | str:
        if value != "auto" and value < 0:
            raise ValueError("alpha must be >= 0 (or auto)")
        return value

    @property
    def step_size(self) -> float:
        """The step the engine takes: eps for one step (FGSM), 2.5 eps / steps for ``auto``, else alpha."""
        if self.steps == 1:
            return float(self.eps)
        if self.alpha == "auto":
            return 2.5 * float(self.eps) / max(self.steps, 1)
        return float(self.alpha)

    @model_validator(mode="after")
    def _check_budget(self) -> PGDConfig:
        if self.norm == "linf" and self.eps > 1:
            raise ValueError(
                f"eps={self.eps:g} is larger than the whole L-inf pixel range [0,1]; write it in pixel units, "
                "e.g. 8/255 or 0.0314"
            )
        reach = self.steps * self.step_size
        if self.steps > 0 and self.eps > 0 and reach + 1e-9 < self.eps and not self.partial_reach:
            need = math.ceil(self.eps / self.step_size - 1e-9) if self.step_size > 0 else "more"
            raise ValueError(
                f"this training attack cannot reach its eps: steps x alpha = {self.steps} x {self.step_size:.5g} = "
                f"{reach:.5g} < eps = {self.eps:.5g} ({255 * reach:.1f}/255 < {255 * self.eps:.1f}/255), so "
                f"training never sees the perturbations the evaluation uses. Fix: alpha >= eps/steps = "
                f"{self.eps / self.steps:.5g} (or alpha: auto), or steps >= {need}; set partial_reach: true only "
                "for a deliberate ablation"
            )
        return self


class DefenseConfig(_Section):
    """The training-time adversary. Every setting is a config value (no files, no env switches)."""

    name: DefenseName = "none"
    pgd: PGDConfig = PGDConfig()
    # Hardness Manipulation
    hm_src: SamplerName = "softhard"
    hm_dst: SamplerName | None = Field(
        default="semihard", description="destination sampler; ignored when a pseudo-hardness schedule is set"
    )
    hm_schedule: ScheduleName = Field(default="lga", description="gradual adversary / pseudo-hardness")
    hm_objective: Literal["et", "l2", "kl"] = Field(default="et", description="l2/kl are experimental")
    hm_u: float = Field(default=0.2, gt=0, description="loss clip u of the gradual adversary")
    hm_xi: float = Field(default=0.1, description="boost xi of g_B")
    hm_constant: float = Field(default=-0.1, ge=-2, le=2, description="destination of the constant schedule")
    hm_ramp_start: float = Field(default=-0.2, ge=-2, le=2, description="linear ramp: H_D at progress 0")
    hm_ramp_end: float = Field(default=0.0, ge=-2, le=2, description="linear ramp: H_D at progress 1")
    # Intra-Class Structure (composable with hm)
    ics: bool = False
    ics_weight: float = Field(default=0.5, ge=0, description="lambda of the ICS term")
    # Panum et al.
    panum_role: Literal["a", "p", "n"] = "p"
    panum_rate: float = Field(default=1.0, ge=0, le=1, description="attack rate rho")
    # CA-TRIDE
    catride_lambda: float = Field(default=10.0, gt=0, description="soft-max temperature of collapseness (the code: "
                                  "CUB 10, Cars 9.5, SOP 2)")
    catride_warmup: bool = Field(default=True, description="ramp the PGD step with training progress (the code's)")
    # plain min-max (EAT's members)
    minmax_clean_weight: float = Field(
        default=0.0, ge=0, le=1, description="minmax: weight lambda of the clean loss, (1-lambda) adversarial + lambda clean"
    )

    @model_validator(mode="after")
    def _ics_needs_hm(self) -> DefenseConfig:
        if self.ics and self.name != "hm":
            raise ValueError("defense.ics=true needs defense.name=hm (ICS uses HM's adversarial anchor)")
        changed = self.catride_lambda != 10.0 or not self.catride_warmup
        if changed and self.name != "catride":
            raise ValueError(f"defense.catride_lambda / catride_warmup are only used by defense.name=catride (got "
                             f"{self.name}); remove them or set defense.name=catride")
        if self.minmax_clean_weight and self.name != "minmax":
            raise ValueError(f"defense.minmax_clean_weight={self.minmax_clean_weight:g} is only used by "
                             f"defense.name=minmax (got {self.name}); remove it or set defense.name=minmax")
        return self


class TrainConfig(_Section):
    """The single-model training loop."""

    epochs: int = Field(default=8, ge=1, description="total epochs; a resumed run trains up to this many")
    max_steps_per_epoch: int | None = Field(default=None, gt=0)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-7, ge=0)
    lr_schedule: Literal["none", "cosine", "step"] = "none"
    lr_step_epochs: int = Field(default=10, gt=0)
    lr_gamma: float = Field(default=0.5, gt=0, le=1)
    grad_clip: float | None = Field(default=None, gt=0)
    seed: int = Field(default=0, ge=0, description="seeds weights, batches and augmentation; derived per epoch and rank")
    eval_every: int = Field(default=1, ge=0, description="epochs between evaluations; 0 = only at the end")
    checkpoint_every: int = Field(default=1, gt=0)
    keep_checkpoints: int | None = Field(
        default=3, gt=0, description="keep the newest N epoch-*.pt files (last.pt always); None: keep all"
    )
    output_dir: Path = Path("runs")
    workers: int = Field(default=1, gt=0, description="Ray Train DDP workers")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, gt=0, description="torch threads; None: leave as is")


class EvalConfig(_Section):
    """What `evaluate` and periodic evaluation run."""

    profile: str | None = Field(default=None, description="attack profile name; None: benign metrics only")
    kmeans_seed: int = Field(default=0, ge=0)
    attack_seed: int = Field(default=0, ge=0)
    max_queries: int | None = Field(default=None, gt=0, description="attack at most N queries (speed)")
    workers: int = Field(default=0, ge=0, description="Ray actors the attacks of `rdml ensemble`'s final evaluation "
                         "are sharded over (one GPU each where there are GPUs; `rdml evaluate` has --workers); 0: in "
                         "the process")
    worker_threads: int = Field(default=1, gt=0, description="torch threads (and Ray CPUs) of each attack worker")


class EnsembleConfig(_Section):
    """EAT: members, data parts, self-transfer. Every member trains with the configured defense (``defense.*``);
    the settings are checked together with the defense when an ensemble starts (:mod:`rdml.ensemble.validate`)."""

    members: int = Field(default=3, gt=0)
    parts: int = Field(default=3, gt=0, description="N class-stratified data parts (not used by split=bootstrap)")
    split: Annotated[str, _member_of("ensemble_splits")] = "leave_one_out"
    self_transfer: Annotated[str, _member_of("self_transfer")] = Field(
        default="none", description="none (independent members), cross_member or ensemble_gradient (docs/eat.md). "
        "none is the one mode valid for every defense and member count; the EAT recipes use cross_member, the mode "
        "the evidence supports (docs/results-eat.md)"
    )
    combine: Annotated[str, _member_of("combine")] = "concat"
    steps_per_epoch: int | None = Field(
        default=None, gt=0, description="steps per epoch (at most a member's pass); None: train.max_steps_per_epoch "
        "or one pass of the smallest member subset"
    )
    placement: Literal["PACK", "SPREAD"] = "PACK"
    max_restarts: int = Field(default=2, ge=0)
    cpus_per_member: float = Field(default=1.0, gt=0)
    transfer_temperature: float = Field(
        default=0.1, gt=0, description="cross_member: softmax temperature over other members' adversarial losses"
    )
    transfer_weight: float = Field(
        default=0.5, gt=0, le=1, description="cross_member: weight w of the loss on transferred examples"
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_clean_weight(cls, data: Any) -> Any:
        """``ensemble.clean_weight`` moved to ``defense.minmax_clean_weight``; configs stored with its default
        (every checkpoint written before the move) still load."""
        if isinstance(data, dict) and "clean_weight" in data:
            data = dict(data)
            value = data.pop("clean_weight")
            if value not in (0, 0.0, None):
                raise ValueError(f"ensemble.clean_weight={value} moved to defense.minmax_clean_weight (members train "
                                 "with the configured defense): set defense.name=minmax and "
                                 f"defense.minmax_clean_weight={value}")
        return data


class TrackingConfig(_Section):
    """MLflow. Only rdml.tracking reads this."""

    enabled: bool = True
    uri: str | None = Field(default=None, description="None: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db")
    experiment: str = Field(default="rdml", min_length=1)
    run_name: str | None = None
    log_model: bool = True


class RayConfig(_Section):
    """Where Ray runs. None: start (or reuse) a local Ray."""

    address: str | None = Field(default=None, min_length=1, description="ray://host:10001, host:6379 or auto")
    num_cpus: int | None = Field(default=None, gt=0)
    num_gpus: int | None = Field(default=None, ge=0)


class ExperimentConfig(_Section):
    """The whole experiment: everything a run needs, nothing from the environment."""

    name: str = Field(default="digits-c2f2", min_length=1, description="names the run (directory, MLflow run)")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    defense: DefenseConfig = DefenseConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (paths as strings)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}
FIX_HINT = ("Fix: give {key} a valid value in the config file or with --set {key}=VALUE; `rdml config` prints "
            "every key with its default.")


def _field_description(loc: tuple[Any, ...]) -> str | None:
    """The description of the config field at ``loc`` (``("train", "epochs")``), if it has one."""
    model: Any = ExperimentConfig
    info = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        model = info.annotation
    return info.description if info is not None else None


def _format_validation_error(err: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        kind = e["type"]
        if kind == "extra_forbidden":
            lines.append(f"  {path}: unknown key (check the spelling; `rdml config` prints every valid key)")
            continue
        about = _field_description(tuple(e["loc"]))
        about = f" ({about})" if about else ""
        if kind in _BOUNDS:
            key, op = _BOUNDS[kind]
            lines.append(f"  {path}: must be {op} {e.get('ctx', {}).get(key)}, got {e.get('input')!r}{about}")
        elif kind == "value_error":  # a model validator's own sentence, which names the fix
            lines.append(f"  {path}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {path}: {e['msg']}; got {e.get('input')!r}{about}")
    fixable = [e for e in err.errors() if e["type"] != "extra_forbidden"]
    if fixable:
        lines.append(FIX_HINT.format(key=".".join(str(p) for p in fixable[0]["loc"]) or "the config"))
    return "\n".join(lines)


def recipe_names() -> list[str]:
    """Names of the recipes shipped inside the package."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files("rdml.recipes").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if not path.exists():
        shipped = resources.files("rdml.recipes").joinpath(f"{source}.yaml")
        if shipped.is_file():
            text = shipped.read_text()
        else:
            raise ConfigError(
                f"config {source!r} is neither a file nor a shipped recipe; recipes: {', '.join(recipe_names())}"
            )
    else:
        text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {source}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. train.epochs=3")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Validate a plain dict (plus dotted overrides) into an :class:`ExperimentConfig`."""
    merged: dict[str, Any] = dict(data or {})
    for override in overrides:
        _apply_override(merged, override)
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(source: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a config from a YAML file or a shipped recipe name (None: all defaults), then apply overrides."""
    data = _read_yaml(source) if source is not None else {}
    return build_config(data, overrides)
