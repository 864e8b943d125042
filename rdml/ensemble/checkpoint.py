"""Ensemble checkpoints: one file per member plus a JSON manifest.

Layout of a run directory::

    <run_dir>/manifest.json              newest complete checkpoint: step, members, files, config
    <run_dir>/step-000040/member-0.pt    Member.state_dict() of member 0 at step 40
    ...

The manifest is written last and atomically (temp file + rename), so a crash while writing leaves
the previous checkpoint valid; older step directories are pruned after the manifest moves on. The
manifest holds the full config, so ``rdml ensemble --resume <run_dir>`` needs nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rdml.config import ExperimentConfig, build_config
from rdml.errors import ConfigError

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass
class Manifest:
    """What a run directory's ``manifest.json`` says."""

    run_dir: Path
    step: int
    members: int
    files: list[str]
    config: ExperimentConfig
    metrics: dict[str, float]
    mlflow_run_id: str | None = None

    def member_state(self, k: int) -> dict[str, Any]:
        return torch.load(self.run_dir / self.files[k], map_location="cpu", weights_only=False)


def save_ensemble_checkpoint(
    run_dir: Path, step: int, states: list[dict[str, Any]], cfg: ExperimentConfig,
    metrics: dict[str, float] | None = None, mlflow_run_id: str | None = None, keep: int = 2,
) -> Path:
    """Write every member's state and then the manifest; returns the manifest path."""
    run_dir = Path(run_dir)
    step_dir = run_dir / f"step-{step:06d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k, state in enumerate(states):
        path = step_dir / f"member-{k}.pt"
        torch.save(state, path)
        files.append(str(path.relative_to(run_dir)))
    manifest = {
        "format": FORMAT,
        "kind": "rdml-eat-ensemble",
        "step": int(step),
        "members": len(states),
        "files": files,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "mlflow_run_id": mlflow_run_id,
        "config": cfg.to_dict(),
    }
    tmp = run_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, run_dir / MANIFEST)
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return run_dir / MANIFEST


def load_manifest(run_dir: Path | str) -> Manifest:
    """Read ``<run_dir>/manifest.json`` (ConfigError naming the fix if it is missing or foreign)."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise ConfigError(f"no ensemble checkpoint at {path}; pass the run directory printed by `rdml ensemble`")
    data = json.loads(path.read_text())
    if data.get("kind") != "rdml-eat-ensemble" or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an rdml ensemble manifest (format {FORMAT})")
    return Manifest(
        run_dir=path.parent, step=int(data["step"]), members=int(data["members"]), files=list(data["files"]),
        config=build_config(data["config"]), metrics=dict(data.get("metrics") or {}),
        mlflow_run_id=data.get("mlflow_run_id"),
    )
