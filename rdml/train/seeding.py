"""Seeding and RNG state capture, so that runs are reproducible and resumes are exact.

The loop reseeds every generator at the start of each epoch from ``(seed, epoch, rank)``. That makes
an epoch's randomness independent of what happened before it (evaluation, checkpointing, a process
restart), which is what makes "1 epoch + resume 1 epoch" equal to "2 epochs straight". The full RNG
states are still stored in checkpoints and restored on resume, for code that draws random numbers
between the reseed and the first step.

The captured states hold only tensors and plain Python values (numpy's MT19937 key as an int64
tensor, not an ndarray), so checkpoints load with ``torch.load(weights_only=True)``; the tuple that
``np.random.get_state()`` returns, as older checkpoints store it, is still accepted on restore.
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


def numpy_state() -> dict[str, Any]:
    """numpy's global RNG state as tensors and plain values (``np.random.get_state()`` holds an ndarray)."""
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_state(state: dict[str, Any] | tuple) -> None:
    """Restore numpy's global RNG from :func:`numpy_state` or from a legacy ``get_state()`` tuple."""
    if isinstance(state, dict):
        key = np.asarray(state["key"], dtype=np.int64).astype(np.uint32)
        state = (state["bit_generator"], key, int(state["pos"]), int(state["has_gauss"]),
                 float(state["cached_gaussian"]))
    np.random.set_state(state)


def rng_state() -> dict[str, Any]:
    """All global RNG states as tensors and plain values (stored in checkpoints, weights-only loadable)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where CUDA is present)."""
    if not state:
        return
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
