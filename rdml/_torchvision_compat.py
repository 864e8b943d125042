"""Make PyPI's torchvision importable next to the CPU build of torch.

PyPI's torchvision 0.28 wheel is a CUDA build: with the local CPU torch its compiled ops fail to
load, and its Python side then registers fake kernels for ``torchvision::nms`` / ``torchvision::qnms``
on operator schemas that do not exist, so ``import torchvision`` dies. Models and transforms need none
of those ops, so when (and only when) loading torchvision's own ``_C`` library fails we define the two
schemas ourselves before the first import. On CUDA installs ``_C`` loads and nothing is changed.

Call :func:`import_torchvision` instead of ``import torchvision`` anywhere in rdml.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

_patched = False
_library = None  # keep the Library object alive: dropping it unregisters the schemas


def _define_missing_schemas() -> None:
    global _library, _patched
    if _patched:
        return
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        return
    package_dir = list(spec.submodule_search_locations)[0]
    candidates = [f for f in os.listdir(package_dir) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    loaded = False
    for name in candidates:
        try:
            torch.ops.load_library(os.path.join(package_dir, name))
            loaded = True
            break
        except (OSError, RuntimeError):
            continue
    if not loaded:
        _library = torch.library.Library("torchvision", "FRAGMENT")
        _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _library.define(
            "qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor"
        )
    _patched = True


def import_torchvision() -> ModuleType:
    """Import and return ``torchvision``, applying the CPU-torch workaround first when needed."""
    _define_missing_schemas()
    import torchvision

    return torchvision
