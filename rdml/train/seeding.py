"""Seeding and RNG state capture, so that runs are reproducible and resumes are exact.

The loop reseeds every generator at the start of each epoch from ``(seed, epoch, rank)``. That makes
an epoch's randomness independent of what happened before it (evaluation, checkpointing, a process
restart), which is what makes "1 epoch + resume 1 epoch" equal to "2 epochs straight". The full RNG
states are still stored in checkpoints and restored on resume, for code that draws random numbers
between the reseed and the first step.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def derive_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed derived from ``seed`` and any integers (epoch, rank, ...), stable across runs."""
    digest = hashlib.sha256(repr((int(seed), *map(int, parts))).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All global RNG states, picklable (stored in checkpoints)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where CUDA is present)."""
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
