"""Ensemble checkpoints: one file per member plus a JSON manifest.

Layout of a run directory::

    <run_dir>/manifest.json              newest complete checkpoint: step, members, files, config
    <run_dir>/step-000040/member-0.pt    Member.state_dict() of member 0 at step 40
    ...

The manifest is written last and atomically (temp file + rename), so a crash while writing leaves
the previous checkpoint valid; older step directories are pruned after the manifest moves on. The
manifest holds the full config, so ``rdml ensemble --resume <run_dir>`` needs nothing else, and
``rdml evaluate <run_dir>`` (or a member file) rebuilds the models from it (:mod:`rdml.ensemble.load`).

Member files hold tensors and plain values only and are read with ``torch.load(weights_only=True)``
(:mod:`rdml.safe_load`); a file holding anything else is refused with a ``CheckpointError`` naming it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdml.config import ExperimentConfig, build_config
from rdml.errors import ConfigError
from rdml.safe_load import load_torch_file
from rdml.train.checkpoint import CheckpointError, atomic_torch_save, atomic_write

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

    def member_file(self, k: int) -> Path:
        """Path of member ``k``'s file at the manifest's step."""
        if not 0 <= k < self.members:
            raise ConfigError(f"member {k} does not exist: {self.run_dir} holds members 0..{self.members - 1}")
        return self.run_dir / self.files[k]

    def member_state(self, k: int) -> dict[str, Any]:
        """Member ``k``'s ``Member.state_dict()`` (read without unpickling anything but tensors and plain values)."""
        return load_member_file(self.member_file(k))


def require_resumable(state: dict[str, Any], run_dir: Path) -> None:
    """ConfigError when a member file was written by an rdml whose members cannot be continued.

    Before members trained with ``Defense.step`` of the configured defense, every member trained plain
    min-max whatever ``defense.name`` said (and kept no defense state); such a run can be evaluated, not resumed.
    """
    if "defense" not in state or not isinstance(state.get("rng"), dict):
        raise ConfigError(
            f"{run_dir} was written by an older rdml (its members trained plain min-max whatever defense.name said, "
            f"with another training step); it can be evaluated (`rdml evaluate {run_dir}`), not resumed: start a new "
            "`rdml ensemble` run"
        )


def load_member_file(path: Path | str) -> dict[str, Any]:
    """A member file's ``Member.state_dict()``; ``CheckpointError`` naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ensemble member file {path} does not exist; the run directory's manifest.json "
                              "names its files: pass the run directory printed by `rdml ensemble`")
    fix = "pass a member file written by `rdml ensemble` (<run_dir>/step-*/member-k.pt)"
    state = load_torch_file(path, what="ensemble member file", error=CheckpointError, legacy_numpy=True, fix=fix)
    if not isinstance(state, dict) or "model" not in state or "member" not in state:
        raise CheckpointError(f"{path} is not an rdml ensemble member file (no member/model); {fix}")
    return state


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
        atomic_torch_save(state, path)  # a crash never leaves half a member file behind
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
    atomic_write(run_dir / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
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
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); pass the run directory printed by `rdml ensemble`") from None
    if not isinstance(data, dict) or data.get("kind") != "rdml-eat-ensemble" or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an rdml ensemble manifest (format {FORMAT})")
    return Manifest(
        run_dir=path.parent, step=int(data["step"]), members=int(data["members"]), files=list(data["files"]),
        config=build_config(data["config"]), metrics=dict(data.get("metrics") or {}),
        mlflow_run_id=data.get("mlflow_run_id"),
    )
