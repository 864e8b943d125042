"""Checkpoints: one self-contained file per saved epoch.

A checkpoint holds everything needed to evaluate *or* resume a run without any other file: model,
optimiser, LR schedule, defense and loss state (proxies), epoch and global step, the full config (as a
plain dict), the model's input geometry, the metrics so far and the RNG states. Files are written
atomically (temporary file in the same directory + ``os.replace``), so a crash or a diverged run never
leaves a half-written or bad ``last.pt`` behind.

Layout of a run directory::

    <train.output_dir>/<run name>/checkpoints/epoch-0001.pt
                                              epoch-0002.pt
                                              last.pt        (a copy of the newest)

Only the newest ``train.keep_checkpoints`` epoch files are kept (``last.pt`` always is).

Checkpoints hold only tensors and plain Python values (the RNG states included, see
:mod:`rdml.train.seeding`) and are read with ``torch.load(weights_only=True)`` (:mod:`rdml.safe_load`):
loading one never runs code from the file. A file holding anything else (a crafted pickle, a foreign
object) is refused with a :class:`CheckpointError` naming it. Checkpoints written before RNG states
were stored as tensors (numpy's state as an ndarray) still load: exactly those numpy pieces are allowed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rdml.config import ExperimentConfig, build_config
from rdml.errors import RdmlError
from rdml.safe_load import load_torch_file

FORMAT_VERSION = 1
LAST = "last.pt"


class CheckpointError(RdmlError):
    """A checkpoint path does not exist, or the file is not (or not safely) an rdml checkpoint."""


@dataclass
class Checkpoint:
    """The content of a checkpoint file (see the module docstring)."""

    config: ExperimentConfig
    epoch: int
    global_step: int
    model_state: dict[str, Any]
    in_channels: int
    image_size: int
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    defense_state: dict[str, Any] | None = None
    loss_state: dict[str, Any] | None = None
    rng_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    return getattr(model, "module", model)


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Write through a temp file in the same directory and rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def save_checkpoint(
    path: str | Path,
    *,
    cfg: ExperimentConfig,
    model: nn.Module,
    in_channels: int,
    image_size: int,
    epoch: int,
    global_step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    defense: Any = None,
    loss: nn.Module | None = None,
    metrics: dict[str, float] | None = None,
    history: list[dict[str, float]] | None = None,
    rng_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    update_last: bool = True,
) -> Path:
    """Write a checkpoint atomically to ``path`` (and copy it to ``last.pt`` beside it).

    ``model`` may be DDP-wrapped; the plain module's state is stored so that :func:`load_model` works
    without a process group. Returns ``path``.
    """
    path = Path(path)
    payload = {
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "epoch": int(epoch),
        "global_step": int(global_step),
        "model_state": unwrap(model).state_dict(),
        "in_channels": int(in_channels),
        "image_size": int(image_size),
        "metrics": dict(metrics or {}),
        "history": list(history or []),
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "defense_state": defense.state_dict() if defense is not None and hasattr(defense, "state_dict") else None,
        "loss_state": loss.state_dict() if loss is not None else None,
        "rng_state": rng_state,
        "extra": dict(extra or {}),
    }
    atomic_torch_save(payload, path)
    if update_last and path.name != LAST:
        atomic_copy(path, path.parent / LAST)
    return path


def prune_checkpoints(ckpt_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` ``epoch-*.pt`` files (never ``last.pt``); returns the deleted."""
    if keep is None:
        return []
    files = sorted(Path(ckpt_dir).glob("epoch-*.pt"))
    doomed = files[: max(0, len(files) - keep)]
    for f in doomed:
        f.unlink(missing_ok=True)
    return doomed


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file, a ``checkpoints/`` directory or a run directory (-> last.pt)."""
    p = Path(path).expanduser()
    for candidate in (p, p / LAST, p / "checkpoints" / LAST):
        if candidate.is_file():
            return candidate
    if p.is_dir():
        raise CheckpointError(
            f"no checkpoint in {p}: expected {p / 'checkpoints' / LAST} (a run directory) or {p / LAST}; "
            "pass a checkpoint file or the run directory printed by `rdml train`"
        )
    raise CheckpointError(f"checkpoint {p} does not exist; pass a checkpoint file (.pt) or a run directory")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint (file, or run directory -> its last.pt). Tensors are mapped to ``map_location``."""
    file = resolve_checkpoint(path)
    raw = load_torch_file(file, what="checkpoint", error=CheckpointError, legacy_numpy=True,
                          map_location=map_location,
                          fix="pass a checkpoint written by `rdml train` (or pick another epoch-*.pt)")
    if isinstance(raw, dict) and "member" in raw and "model" in raw and "model_state" not in raw:
        raise CheckpointError(
            f"{file} is an EAT ensemble member file, not a training checkpoint; `rdml evaluate` and "
            "`rdml attack` take it inside its run directory (<run_dir>/step-*/member-k.pt next to manifest.json), "
            "`rdml ensemble --resume <run_dir>` continues the ensemble"
        )
    if not isinstance(raw, dict) or "model_state" not in raw or "config" not in raw:
        raise CheckpointError(f"{file} is not an rdml checkpoint (no model_state/config); was it written by rdml?")
    return Checkpoint(
        config=build_config(raw["config"]),
        epoch=raw["epoch"],
        global_step=raw.get("global_step", 0),
        model_state=raw["model_state"],
        in_channels=raw["in_channels"],
        image_size=raw["image_size"],
        metrics=raw.get("metrics", {}),
        history=raw.get("history", []),
        optimizer_state=raw.get("optimizer_state"),
        scheduler_state=raw.get("scheduler_state"),
        defense_state=raw.get("defense_state"),
        loss_state=raw.get("loss_state"),
        rng_state=raw.get("rng_state"),
        extra=raw.get("extra", {}),
        path=file,
    )


def model_from_checkpoint(ckpt: Checkpoint, device: str | torch.device = "cpu") -> nn.Module:
    """The checkpoint's model rebuilt from its own config and geometry; eval mode, on ``device``."""
    from rdml.models import build_model

    model = build_model(ckpt.config.model, in_channels=ckpt.in_channels, image_size=ckpt.image_size)
    model.load_state_dict(ckpt.model_state)
    return model.to(device).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ExperimentConfig]:
    """Rebuild the model from the config stored in the checkpoint alone; eval mode, on ``device``."""
    ckpt = load_checkpoint(path, map_location="cpu")
    return model_from_checkpoint(ckpt, device), ckpt.config
