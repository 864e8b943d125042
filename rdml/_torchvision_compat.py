"""Make PyPI's torchvision importable next to the CPU build of torch, for rdml and for its users.

PyPI's torchvision 0.28 wheel is a CUDA build: with the local CPU torch its compiled ops fail to
load, and its Python side then registers fake kernels for ``torchvision::nms`` / ``torchvision::qnms``
on operator schemas that do not exist, so ``import torchvision`` dies. Models and transforms need none
of those ops, so when (and only when) loading torchvision's own ``_C`` library fails we define the two
schemas ourselves before the first import. On CUDA installs ``_C`` loads and nothing is changed.

The fix has to run before torchvision's *first* import, whoever imports it (a user's notebook does
``import rdml`` and then ``import torchvision``). Importing this module, which ``import rdml`` does,
therefore puts a small finder at the front of ``sys.meta_path`` that applies the fix when the import
system first looks for ``torchvision`` and then removes itself. That keeps ``import rdml`` cheap:
neither torch nor torchvision is imported until someone imports torchvision. If torchvision was
imported before rdml, there is nothing left to fix (it either worked or already failed).

torchvision is optional (the ``[vision]`` extra): rdml's own code calls :func:`import_torchvision`,
which names the release to install when it is missing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from rdml.extras import missing_extra

_patched = False
_library = None  # keep the Library object alive: dropping it unregisters the schemas


def _define_missing_schemas() -> None:
    global _library, _patched
    if _patched:
        return
    _patched = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        return
    import torch

    package_dir = list(spec.submodule_search_locations)[0]
    candidates = [f for f in os.listdir(package_dir) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    for name in candidates:
        try:
            torch.ops.load_library(os.path.join(package_dir, name))
            return
        except (OSError, RuntimeError):
            continue
    _library = torch.library.Library("torchvision", "FRAGMENT")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Applies the fix when ``torchvision`` is first looked up, then steps aside; it never finds anything."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> None:
        if fullname == "torchvision":
            remove_import_hook()  # first: the fix itself looks torchvision up
            _define_missing_schemas()
        return None


_HOOK = _BeforeTorchvision()


def install_import_hook() -> None:
    """Apply the fix just before the first ``import torchvision`` of this process (imports nothing now)."""
    if _patched or "torchvision" in sys.modules or _HOOK in sys.meta_path:
        return
    sys.meta_path.insert(0, _HOOK)


def remove_import_hook() -> None:
    """Take the finder off ``sys.meta_path`` (it is one-shot)."""
    while _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def import_torchvision() -> ModuleType:
    """Import and return ``torchvision``, applying the CPU-torch workaround first when needed.

    A missing torchvision is a :class:`~rdml.extras.MissingExtraError` naming the release to install.
    """
    remove_import_hook()
    _define_missing_schemas()
    try:
        import torchvision
    except ModuleNotFoundError as exc:
        missing = missing_extra(exc)
        if missing is None:
            raise
        raise missing from None
    return torchvision


install_import_hook()
