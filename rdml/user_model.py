"""Models rdml did not train: a factory named by import path, or a TorchScript file (``rdml evaluate --model``).

``--model package.module:factory`` imports ``package.module``, reads ``factory`` (a function or class
that builds the model when called without arguments, or a module-level ``nn.Module``; dotted
attributes such as ``module:Class.build`` work) and, with ``--weights FILE``, loads a state dict into
it with ``torch.load(weights_only=True)`` (:mod:`rdml.safe_load`: nothing in the file is ever run).
``--model FILE.pt`` loads a TorchScript archive (``torch.jit.save``) with ``torch.jit.load``.

Every way this can go wrong is an :class:`rdml.errors.RdmlError` that names the problem and the fix: an
import path that does not import, a factory that does not return an ``nn.Module``, weights that do not
fit the model, a file that is not TorchScript.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rdml.errors import RdmlError


class ModelLoadError(RdmlError):
    """A user model (import path, factory, weights or TorchScript file) could not be loaded."""


FORMAT = "--model takes package.module:factory (a function or class returning an nn.Module) or a TorchScript file"


def load_user_model(spec: str, weights: str | Path | None = None, device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, str]:
    """``(model in eval mode on device, description)`` from an import path or a TorchScript file."""
    path = Path(spec).expanduser()
    if ":" not in spec or path.is_file():
        if not path.is_file():
            raise ModelLoadError(f"{spec!r} is neither an import path nor a file: {FORMAT}, e.g. "
                                 "--model torchvision.models:resnet18 or --model model.ts")
        model, what = _torchscript(path), f"TorchScript {path}"
    else:
        model, what = _from_factory(spec), f"model {spec}"
    if weights is not None:
        _load_weights(model, Path(weights).expanduser(), spec)
        what += f" with weights {weights}"
    return model.to(device).eval(), what


def _from_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"{spec!r}: {FORMAT}; both the module and the factory name are needed")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import {module_name!r} for --model {spec} ({type(exc).__name__}: {exc}); make "
                             "the package importable (pip install it, or run from the directory that holds it / add "
                             "that directory to PYTHONPATH)") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"{module_name} has no attribute {attr!r} (--model {spec}); name a function or class "
                                 f"of {module_name} that returns the model")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelLoadError(f"{spec} is a {type(obj).__name__}, not a factory; name a function or class that returns "
                             "an nn.Module when called without arguments")
    try:
        model = obj()
    except TypeError as exc:
        raise ModelLoadError(f"calling {spec}() failed ({exc}); the factory must build the model without arguments: "
                             f"wrap it, e.g. def factory(): return {attr}(embedding_dim=128)") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module; the factory must "
                             "build and return the model (e.g. def factory(): return MyNet())")
    return model


def _torchscript(path: Path) -> nn.Module:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path} is not a TorchScript archive ({first}); save one with "
                             "torch.jit.save(torch.jit.script(model), path), pass a checkpoint of rdml as the "
                             "CHECKPOINT argument, or plain weights with --model package.module:factory --weights "
                             "FILE") from None


def state_dict_of(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """The state dict inside a loaded weights file: the file itself, or its ``state_dict``/``model``/``model_state``."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    return None


def _load_weights(model: nn.Module, path: Path, spec: str) -> None:
    from rdml.safe_load import load_torch_file

    fix = "pass a file written by torch.save(model.state_dict(), FILE)"
    obj = load_torch_file(path, what="weights file", fix=fix, error=ModelLoadError)
    state = state_dict_of(obj)
    if state is None:
        raise ModelLoadError(f"{path} holds no state dict (a mapping of parameter names to tensors, or one under "
                             f"'state_dict' / 'model_state' / 'model'); {fix}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3] if len(lines) > 1 else lines)[:400]
        raise ModelLoadError(f"the weights in {path} do not fit the model built by {spec} ({detail}); pass the "
                             "weights saved from this architecture (model.state_dict()) or the factory that built "
                             "them") from None
