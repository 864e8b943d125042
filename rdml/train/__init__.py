"""The training loop for one model, its checkpoints and resume (no Ray import in this package).

``fit(cfg)`` trains in-process; Ray Train (:mod:`rdml.distributed.train_ray`), Tune and the tests all
call it. ``load_model(path)`` rebuilds a trained model from a checkpoint file alone.
"""

from rdml.train.callbacks import Callback, CallbackList
from rdml.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    unwrap,
)
from rdml.train.loop import TrainResult, default_run_dir, fit, resolve_device

__all__ = [
    "Callback",
    "CallbackList",
    "Checkpoint",
    "CheckpointError",
    "TrainResult",
    "default_run_dir",
    "fit",
    "load_checkpoint",
    "load_model",
    "prune_checkpoints",
    "resolve_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "unwrap",
]
