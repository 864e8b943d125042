"""Optional dependencies: which pip extra brings which module, and the error that names it.

``pip install ".[cpu]"`` (or ``[gpu]``) in a checkout gives the library: models, losses, defenses, attacks and
evaluation, next to whatever torch the user already has. Ray (``rdml train``/``ensemble``/``tune``, the
jobs), MLflow (tracking, ``rdml ui``) and torchvision (ResNet backbones, 224x224 image data sets) are
extras, imported lazily where they are used. When one is missing, the user gets a
:class:`MissingExtraError` that names the extra to install instead of an ImportError traceback: the
CLI turns a ``ModuleNotFoundError`` for one of these modules into it (:func:`missing_extra`), and
library code can check up front with :func:`require`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from rdml.errors import RdmlError

#: top-level module -> (pip extra, what rdml needs it for)
EXTRAS: dict[str, tuple[str, str]] = {
    "ray": ("ray", "Ray runs training (rdml train without --no-ray), EAT ensembles, Tune searches and jobs"),
    "mlflow": ("mlflow", "MLflow tracks runs (set tracking.enabled=false to run without it) and serves rdml ui"),
    "torchvision": ("vision", "torchvision provides the ResNet backbones and the 224x224 image transforms"),
    "faiss": ("cpu", "faiss runs the nearest-neighbour search and k-means of the evaluation"),
}


class MissingExtraError(RdmlError):
    """An optional dependency is not installed; the message names the pip extra (or release) to install."""


def _torchvision_hint() -> str:
    """torchvision pins one torch release: with a torch installed, name the matching torchvision."""
    try:
        release = importlib.metadata.version("torch").split("+")[0]
        major, minor = (int(part) for part in release.split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "install the extra rdml[vision] (pip install -e '.[vision]' in the rdml checkout)"
    if major != 2:
        return f"install the torchvision release that matches your torch {release} (pytorch.org lists them)"
    return (f"install the torchvision that matches your torch {release}: pip install 'torchvision==0.{minor + 15}.*' "
            "(in a new environment the extra rdml[vision] lets pip pick torch and torchvision together)")


def message(module: str) -> str:
    """What is missing, what needs it, and the install command."""
    extra, needed_for = EXTRAS[module]
    if module == "torchvision":
        fix = _torchvision_hint()
    elif module == "faiss":
        fix = ("install the extra rdml[cpu] (faiss-cpu), or rdml[gpu] (faiss-gpu) on a CUDA machine, never "
               "both: pip install -e '.[cpu]' in the rdml checkout")
    else:
        fix = (f"install the extra rdml[{extra}]: pip install -e '.[{extra}]' in the rdml checkout "
               "('.[all]' adds Ray, MLflow and torchvision)")
    return f"{module} is not installed: {needed_for}. Fix: {fix}"


def missing_extra(exc: ModuleNotFoundError) -> MissingExtraError | None:
    """The :class:`MissingExtraError` for an import that failed on an optional dependency, else None."""
    top = (exc.name or "").split(".")[0]
    return MissingExtraError(message(top)) if top in EXTRAS else None


def require(module: str) -> None:
    """Raise :class:`MissingExtraError` unless the optional ``module`` is installed (does not import it)."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(message(module))
