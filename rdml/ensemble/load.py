"""Models to evaluate or attack, from whatever path a user passes: training or ensemble outputs.

``rdml evaluate`` and ``rdml attack`` take any of

* a training checkpoint (``.pt``), its ``checkpoints/`` directory or its run directory (-> ``last.pt``);
* an EAT ensemble run directory (it holds ``manifest.json``), or that ``manifest.json``: the combined
  embedding of all members (:class:`rdml.ensemble.combine.EnsembleModel`), the manifest's config
  deciding the data set, the member architecture and the combine rule;
* one member file of an ensemble run (``<run_dir>/step-*/member-k.pt``): that member alone, its config
  read from the ``manifest.json`` of the run directory it lies in.

:func:`load_any_model` dispatches on what the path is; :func:`load_ensemble_model` is the ensemble side.
Every file is read without unpickling anything but tensors and plain values (:mod:`rdml.safe_load`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from rdml.config import ExperimentConfig
from rdml.ensemble.checkpoint import MANIFEST, Manifest, load_manifest, load_member_file
from rdml.train.checkpoint import LAST, CheckpointError

MEMBER_FILE = re.compile(r"^member-(\d+)\.pt$")
STEP_DIR = re.compile(r"^step-\d+$")


@dataclass
class LoadedModel:
    """A model ready for evaluation (eval mode), its config, and what it was loaded from, in words."""

    model: nn.Module
    config: ExperimentConfig
    description: str


@dataclass
class EnsembleSource:
    """An ensemble path resolved: its manifest, and the member file when the path is one member."""

    manifest: Manifest
    member_file: Path | None = None


def find_ensemble(path: str | Path) -> EnsembleSource | None:
    """The ensemble a path points at (run directory, manifest.json, member file); None if it is no ensemble path."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / MANIFEST).is_file() and not (p / LAST).is_file() and not (p / "checkpoints" / LAST).is_file():
            return EnsembleSource(load_manifest(p))
        return None
    if p.is_file() and p.name == MANIFEST:
        return EnsembleSource(load_manifest(p))
    if p.is_file() and MEMBER_FILE.match(p.name) and STEP_DIR.match(p.parent.name):
        manifest = p.parent.parent / MANIFEST
        if not manifest.is_file():
            raise CheckpointError(
                f"{p} is an ensemble member file, but {manifest} (which holds its config) is missing; "
                "pass the member file inside the run directory written by `rdml ensemble`"
            )
        return EnsembleSource(load_manifest(manifest), p)
    return None


def _geometry(cfg: ExperimentConfig, dataset: Any | None) -> tuple[int, int]:
    """(in_channels, image_size) of the config's data set: member files do not store the input geometry."""
    if dataset is None:
        from rdml.data import build_datasets

        dataset = build_datasets(cfg.data).test
    return int(dataset.in_channels), int(dataset.image_size)


def _fit_error(exc: RuntimeError, what: str, cfg: ExperimentConfig) -> CheckpointError:
    first = str(exc).strip().splitlines()[0]
    return CheckpointError(
        f"the weights in {what} do not fit the model of its manifest's config (model.arch={cfg.model.arch}, "
        f"data.name={cfg.data.name}): {first}; evaluate the run directory the files came from"
    )


def load_ensemble_model(
    path: str | Path, device: str = "cpu", dataset: Any | None = None
) -> tuple[nn.Module, ExperimentConfig]:
    """The combined ensemble (run directory or manifest.json) or one member (member file), and the config.

    ``dataset`` (any split of the config's data set) gives the input geometry; without it the test
    split is built. The model is in eval mode on ``device``.
    """
    source = find_ensemble(path)
    if source is None:
        raise CheckpointError(
            f"{path} is not an ensemble run: pass the run directory printed by `rdml ensemble` (it holds "
            f"{MANIFEST}), its {MANIFEST}, or one of its step-*/member-k.pt files"
        )
    return _build(source, device, dataset).model, source.manifest.config


def _build(source: EnsembleSource, device: str, dataset: Any | None) -> LoadedModel:
    from rdml.ensemble.combine import ensemble_from_states
    from rdml.models import build_model

    manifest, cfg = source.manifest, source.manifest.config
    in_channels, image_size = _geometry(cfg, dataset)
    if source.member_file is not None:
        state = load_member_file(source.member_file)
        model = build_model(cfg.model, in_channels, image_size)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise _fit_error(exc, str(source.member_file), cfg) from None
        step = source.member_file.parent.name.removeprefix("step-").lstrip("0") or "0"
        return LoadedModel(model.to(device).eval(), cfg,
                           f"member {int(state['member'])} of the ensemble {manifest.run_dir} (step {step})")
    states = [manifest.member_state(k)["model"] for k in range(manifest.members)]
    try:
        model = ensemble_from_states(cfg.model, in_channels, image_size, states, cfg.ensemble.combine, device)
    except RuntimeError as exc:
        raise _fit_error(exc, f"the member files of {manifest.run_dir}", cfg) from None
    return LoadedModel(model, cfg, f"ensemble {manifest.run_dir} ({manifest.members} members, "
                                   f"combine={cfg.ensemble.combine}, step {manifest.step})")


def load_any_model(path: str | Path, device: str = "cpu", dataset: Any | None = None) -> LoadedModel:
    """A model from a training checkpoint or run directory, an ensemble run directory, or a member file."""
    from rdml.train.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint

    p = Path(path).expanduser()
    source = find_ensemble(p)
    if source is not None:
        return _build(source, device, dataset)
    if p.is_dir() and not (p / LAST).is_file() and not (p / "checkpoints" / LAST).is_file():
        raise CheckpointError(
            f"no checkpoint in {p}: expected {p / 'checkpoints' / LAST} (a run directory of `rdml train`) or "
            f"{p / MANIFEST} (a run directory of `rdml ensemble`); pass one of those or a checkpoint file"
        )
    ckpt = load_checkpoint(resolve_checkpoint(p), map_location="cpu")
    return LoadedModel(model_from_checkpoint(ckpt, device), ckpt.config, f"checkpoint {ckpt.path} (epoch {ckpt.epoch})")
