"""Reading rdml's torch files without ever running code stored in them.

Every file rdml reads back (training checkpoints, ensemble member files, the ``examples.pt`` of an
evaluation) goes through :func:`load_torch_file`, which calls ``torch.load(weights_only=True)``: the
restricted unpickler builds tensors, plain containers, strings and numbers, and refuses any other
global (a crafted ``__reduce__`` payload, a foreign class) before it is called.

rdml writes only those types. Checkpoints written before this module existed also hold numpy arrays
(numpy's RNG state, an ensemble member's data indices); ``legacy_numpy=True`` allows exactly the
pieces those need (``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype`` and
the uint32/int64 dtype classes, also under numpy 1's ``numpy.core`` name), so old files keep loading.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rdml.errors import RdmlError

_reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct

#: What old checkpoints of the current layout need: numpy's MT19937 key (uint32) and int64 indices.
LEGACY_NUMPY_GLOBALS: list[Any] = [
    _reconstruct,
    (_reconstruct, "numpy.core.multiarray._reconstruct"),  # the name numpy 1.x wrote
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    type(np.dtype(np.int64)),
]

_LEGACY_NAMES = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in LEGACY_NUMPY_GLOBALS}
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")
_REFUSED = ("Unsupported global", "GLOBAL ", "Can only build", "allowlisted", "was not an allowed global")


def _refused_object(message: str) -> str | None:
    """The global the restricted unpickler refused ('posix.system'), '' if unnamed, None if not a refusal."""
    m = _GLOBAL.search(message)
    if m:
        return m.group(1) or m.group(2)
    return "" if any(s in message for s in _REFUSED) else None


def load_torch_file(
    path: str | Path,
    *,
    what: str,
    fix: str,
    error: type[RdmlError] = RdmlError,
    legacy_numpy: bool = False,
    map_location: str | torch.device = "cpu",
) -> Any:
    """``torch.load(path, weights_only=True)``; ``error`` naming the file when it cannot or must not be read.

    ``what`` names the kind of file in messages ("checkpoint"); ``fix`` says what to pass instead
    when the file is unreadable or not one of rdml's. A file holding objects other than tensors and
    plain values is refused (its code never runs) with a message that says so.
    """
    path = Path(path)
    allowed = LEGACY_NUMPY_GLOBALS if legacy_numpy else []
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            # a plain pickle (not torch.save's zip) makes torch warn about its protocol before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_object(str(exc))
        if refused is None:
            opcode = re.search(r"Unsupported operand \d+", str(exc))
            detail = f"not a torch file: {opcode.group(0)}" if opcode else _first_line(exc)
            raise error(f"{path} is not a readable {what} ({detail}); {fix}") from None
        names = [n for n in _unsafe_globals(path) if not (legacy_numpy and n in _LEGACY_NAMES)]
        names = names or ([refused] if refused else [])
        named = f" ({', '.join(names)})" if names else ""
        raise error(
            f"{path} contains objects rdml will not unpickle{named}: rdml reads files with "
            f"torch.load(weights_only=True), which builds only tensors and plain values and never runs code "
            f"from a file. This is not an rdml {what} as rdml writes it: {fix}; if the file comes from a source "
            "you trust, re-save it from a trusted source with tensors and plain values only"
        ) from None
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise error(f"{path} is not a readable {what} ({_first_line(exc) or type(exc).__name__}); {fix}") from None


def _unsafe_globals(path: Path) -> list[str]:
    """Every global a torch.save zip file refers to beyond the default allow-list (read, never called)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip file (a plain pickle): the unpickler's message names the first one
        return []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""
