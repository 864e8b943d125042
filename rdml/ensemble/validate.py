"""Every ensemble setting, the defense and the self-transfer mode's requirements, checked together.

An ensemble run is refused before anything starts (data, Ray, MLflow) when a setting would be
silently ignored or cannot work with the others, with every problem and its fix in one
:class:`~rdml.errors.ConfigError`. The single-model settings themselves are validated by
:mod:`rdml.config`; here only what an ensemble adds.
"""

from __future__ import annotations

import torch

from rdml.config import EnsembleConfig, ExperimentConfig
from rdml.errors import ConfigError


def _default(name: str):
    return EnsembleConfig.model_fields[name].default


def ensemble_problems(cfg: ExperimentConfig) -> list[str]:
    """The problems of ``cfg`` as an ensemble configuration (empty: it can run)."""
    from rdml.ensemble.transfer import get_transfer

    e, problems = cfg.ensemble, []
    try:
        problems += get_transfer(e.self_transfer).requirements(cfg)
    except ConfigError as err:
        problems.append(str(err))
    if e.members == 1 and e.split != "bootstrap" and e.parts > 1:
        share = f"{e.parts - 1} of the {e.parts} parts" if e.split == "leave_one_out" else f"1 of the {e.parts} parts"
        problems.append(f"one member with ensemble.parts={e.parts} would train on {share} of the training set: set "
                        "ensemble.parts=1 (one member on the whole set is exactly `rdml train`)")
    if e.split == "bootstrap" and e.parts != _default("parts"):
        problems.append(f"ensemble.parts={e.parts} is not used by ensemble.split=bootstrap (each member draws a "
                        "class-stratified resample of the whole set): remove ensemble.parts or choose another split")
    if e.self_transfer != "cross_member":
        for name in ("transfer_temperature", "transfer_weight"):
            if getattr(e, name) != _default(name):
                problems.append(f"ensemble.{name}={getattr(e, name):g} is only used by ensemble.self_transfer="
                                f"cross_member (this run uses {e.self_transfer}): remove it")
    if e.steps_per_epoch is not None and cfg.train.max_steps_per_epoch is not None:
        problems.append(f"both ensemble.steps_per_epoch={e.steps_per_epoch} and train.max_steps_per_epoch="
                        f"{cfg.train.max_steps_per_epoch} are set; an ensemble uses one: remove one of them")
    if cfg.train.workers != 1:
        problems.append(f"train.workers={cfg.train.workers} (data-parallel workers of `rdml train`) does not apply to "
                        "ensemble members, which are one process each: set train.workers=1")
    try:  # the defense's own checks (e.g. hm needs loss.name=triplet), now rather than inside a member
        from rdml.defenses import build_defense
        from rdml.losses import build_loss

        with torch.random.fork_rng(devices=[]):
            build_defense(cfg.defense, cfg.loss, build_loss(cfg.loss, 2, cfg.model.embedding_dim))
    except ConfigError as err:
        problems.append(str(err))
    return problems


def check_ensemble(cfg: ExperimentConfig) -> None:
    """ConfigError listing every problem of ``cfg`` as an ensemble configuration."""
    problems = ensemble_problems(cfg)
    if problems:
        raise ConfigError("this ensemble configuration cannot run:\n  - " + "\n  - ".join(problems))
