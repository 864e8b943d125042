"""rdml's own model files: weights plus a JSON description, loadable without executing code.

MLflow's ``pytorch`` flavour pickles the whole module (``torch.save(model)``), and loading it
(``mlflow.pytorch.load_model``) unpickles, which runs whatever code the file names. rdml logs that
flavour for MLflow's own tools (the UI's model page, ``mlflow models serve``) but never loads it.
Next to it, every logged model gets an ``rdml/`` folder:

* ``rdml/model.json``: what to build: ``kind`` (``model`` or ``ensemble``), the experiment config,
  the input geometry (``in_channels``, ``image_size``) and, for an ensemble, ``members`` and ``combine``;
* ``rdml/state_dict.pt``: the weights, a dict of tensors read back with ``torch.load(weights_only=True)``.

:func:`read_model_dir` rebuilds the module from the config with :func:`rdml.models.build_model`, so
loading runs only rdml's code.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rdml.errors import TrackingError

SPEC_FILE = "model.json"
WEIGHTS_FILE = "state_dict.pt"
FORMAT = 1
KINDS = ("model", "ensemble")


def model_spec(cfg: Any, in_channels: int, image_size: int, *, members: int | None = None,
               combine: str | None = None) -> dict[str, Any]:
    """The description of a single model (``members`` None) or of an EAT ensemble of ``members`` models."""
    spec: dict[str, Any] = {"format": FORMAT, "kind": "model" if members is None else "ensemble",
                            "config": cfg.to_dict(), "in_channels": int(in_channels), "image_size": int(image_size)}
    if members is not None:
        spec.update(members=int(members), combine=combine or "concat")
    return spec


def write_model_dir(model: Any, spec: dict[str, Any], directory: str | Path) -> Path:
    """Write ``model.json`` and ``state_dict.pt`` (CPU tensors) into ``directory``; returns it."""
    import torch

    if spec.get("kind") not in KINDS:
        raise ValueError(f"model spec kind must be one of {KINDS}, got {spec.get('kind')!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, out / WEIGHTS_FILE)
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    return out


def read_model_dir(directory: str | Path, device: str = "cpu") -> Any:
    """Rebuild the model written by :func:`write_model_dir` (eval mode); no code is loaded from the files."""
    import torch

    from rdml.config import build_config
    from rdml.models import build_model

    directory = Path(directory)
    try:
        spec = json.loads((directory / SPEC_FILE).read_text())
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise TrackingError(f"{directory} holds no rdml model files ({exc.filename} is missing); rdml loads only "
                            f"models logged by rdml (rdml/{SPEC_FILE} + rdml/{WEIGHTS_FILE})") from None
    except Exception as exc:  # noqa: BLE001 - a foreign or damaged file is the user's to know about
        raise TrackingError(f"cannot read the rdml model files in {directory}: {exc}; they hold only a JSON "
                            "description and tensors (weights_only), re-log the model with rdml") from None
    if spec.get("format") != FORMAT or spec.get("kind") not in KINDS:
        raise TrackingError(f"{directory / SPEC_FILE} is not an rdml model description (format {FORMAT})")
    cfg = build_config(spec["config"])
    # the weights come from the file: a pretrained backbone path of the training machine is not needed
    model_cfg = cfg.model.model_copy(update={"pretrained": None})
    with quiet_rebuilds():
        if spec["kind"] == "model":
            model = build_model(model_cfg, spec["in_channels"], spec["image_size"])
        else:
            from rdml.ensemble.combine import EnsembleModel

            members = [build_model(model_cfg, spec["in_channels"], spec["image_size"]) for _ in range(spec["members"])]
            model = EnsembleModel(members, spec["combine"])
    model.load_state_dict(state)
    return model.to(device).eval()


class _DropFromScratch(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "training from scratch" not in record.getMessage()


@contextlib.contextmanager
def quiet_rebuilds() -> Iterator[None]:
    """Silence "training from scratch" while models are rebuilt only to receive saved weights.

    :class:`rdml.models.resnet.ResNetEmbedding` warns when built without pretrained weights, which is
    right when training starts and wrong (and repeated) when the weights are loaded right after.
    """
    logger = logging.getLogger("rdml.models.resnet")
    flt = _DropFromScratch()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)
