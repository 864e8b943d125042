"""Typed, validated experiment configuration.

A config is data: it is loaded from YAML (a file path or the name of a shipped recipe in
``rdml/recipes``), changed with dotted ``--set a.b=c`` overrides, validated in full before any work
starts, logged to MLflow and stored in every checkpoint, so that a checkpoint alone is enough to
evaluate or resume. Unknown keys and out-of-range values are rejected with the key path and the
allowed values (:class:`rdml.errors.ConfigError`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rdml.errors import ConfigError

DatasetName = Literal["digits", "mnist", "fashion", "cub", "cars", "sop", "inshop", "folder"]
SamplerName = Literal["random", "semihard", "softhard", "distance", "hardest"]
ScheduleName = Literal["none", "lga", "boost", "g2", "gsqrt", "constant", "linear"]


class _Section(BaseModel):
    """Strict base: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DataConfig(_Section):
    """Which dataset, where it lives, and how batches are formed."""

    name: DatasetName = "digits"
    root: Path | None = Field(
        default=None, description="dataset directory; default $RDML_DATA/<name> or ~/.rdml/data/<name>"
    )
    image_size: int | None = Field(default=None, gt=0, description="None: 28 for 28x28 sets, 224 otherwise")
    batch_pairs: int = Field(default=32, gt=0, description="SPC-2 pairs per batch: 2*batch_pairs images")
    batch_sampler: Literal["pairs", "m_per_class"] = "pairs"
    m_per_class: int = Field(default=2, ge=2)
    eval_batch_size: int = Field(default=256, gt=0)
    num_workers: int = Field(default=0, ge=0)
    train_classes: list[str] | None = Field(default=None, description="folder dataset: training classes")
    test_classes: list[str] | None = Field(default=None, description="folder dataset: test classes")
    limit_train: int | None = Field(default=None, gt=0, description="use a fixed seeded subset of N training images")
    limit_test: int | None = Field(default=None, gt=0, description="use a fixed seeded subset of N test images")
    manifest_dir: Path | None = Field(default=None, description="where Parquet manifests go; default <root>")


class ModelConfig(_Section):
    """Backbone and embedding head. Inputs are [0,1] pixels; normalisation happens inside forward."""

    arch: Literal["c2f2", "resnet18", "resnet50"] = "c2f2"
    embedding_dim: int = Field(default=512, gt=0)
    pretrained: Path | None = Field(default=None, description="local torchvision state_dict for the backbone")
    freeze_bn: bool | None = Field(default=None, description="None: frozen for ResNets, n/a for c2f2")


class LossConfig(_Section):
    """The metric-learning loss and its in-batch triplet sampler."""

    name: Literal["triplet", "contrastive", "proxy_anchor"] = "triplet"
    sampler: SamplerName = "random"
    margin: float = Field(default=0.2, ge=0, description="triplet margin gamma on the normalised metric")
    pos_margin: float = Field(default=0.0, ge=0, description="contrastive positive margin")
    neg_margin: float = Field(default=1.0, ge=0, description="contrastive negative margin")
    proxy_margin: float = Field(default=0.1, ge=0, description="proxy-anchor delta")
    proxy_alpha: float = Field(default=32.0, gt=0, description="proxy-anchor scale")
    proxy_lr_multiplier: float = Field(default=100.0, gt=0)


class PGDConfig(_Section):
    """A PGD budget: ball, step, iterations. eps and alpha are in [0,1] pixel units."""

    eps: float = Field(default=77 / 255, ge=0)
    alpha: float = Field(default=3 / 255, ge=0)
    steps: int = Field(default=8, ge=0)
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool = False


class DefenseConfig(_Section):
    """The training-time adversary. Every setting is a config value (no files, no env switches)."""

    name: Literal["none", "est", "act", "hm", "panum"] = "none"
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

    @model_validator(mode="after")
    def _ics_needs_hm(self) -> DefenseConfig:
        if self.ics and self.name != "hm":
            raise ValueError("defense.ics=true needs defense.name=hm (ICS uses HM's adversarial anchor)")
        return self


class TrainConfig(_Section):
    """The single-model training loop."""

    epochs: int = Field(default=8, ge=0)
    max_steps_per_epoch: int | None = Field(default=None, gt=0)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-7, ge=0)
    lr_schedule: Literal["none", "cosine", "step"] = "none"
    lr_step_epochs: int = Field(default=10, gt=0)
    lr_gamma: float = Field(default=0.5, gt=0, le=1)
    grad_clip: float | None = Field(default=None, gt=0)
    seed: int = 0
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
    kmeans_seed: int = 0
    attack_seed: int = 0
    max_queries: int | None = Field(default=None, gt=0, description="attack at most N queries (speed)")


class EnsembleConfig(_Section):
    """EAT: members, data parts, self-transfer."""

    members: int = Field(default=3, gt=0)
    parts: int = Field(default=3, gt=0, description="N class-stratified data parts")
    split: Literal["leave_one_out", "disjoint", "bootstrap"] = "leave_one_out"
    self_transfer: Literal["ensemble_gradient", "cross_member", "none"] = Field(
        default="none", description="best ERS on digits at equal cost (docs/eat.md); EAT's readings A/B are switches"
    )
    combine: Literal["concat", "mean"] = "concat"
    clean_weight: float = Field(default=0.0, ge=0, le=1, description="lambda: weight of the clean loss")
    steps_per_epoch: int | None = Field(default=None, gt=0)
    placement: Literal["PACK", "SPREAD"] = "PACK"
    max_restarts: int = Field(default=2, ge=0)
    cpus_per_member: float = Field(default=1.0, gt=0)
    transfer_temperature: float = Field(
        default=0.1, gt=0, description="cross_member: softmax temperature over other members' adversarial losses"
    )


class TrackingConfig(_Section):
    """MLflow. Only rdml.tracking reads this."""

    enabled: bool = True
    uri: str | None = Field(default=None, description="None: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db")
    experiment: str = "rdml"
    run_name: str | None = None
    log_model: bool = True


class RayConfig(_Section):
    """Where Ray runs. None: start (or reuse) a local Ray."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, gt=0)
    num_gpus: int | None = Field(default=None, ge=0)


class ExperimentConfig(_Section):
    """The whole experiment: everything a run needs, nothing from the environment."""

    name: str = "digits-c2f2"
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


def _format_validation_error(err: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        kind = e["type"]
        if kind == "extra_forbidden":
            lines.append(f"  {path}: unknown key (check the spelling; `rdml config` prints every valid key)")
            continue
        lines.append(f"  {path}: {e['msg']}; got {e.get('input')!r}")
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
