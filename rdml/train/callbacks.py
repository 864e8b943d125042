"""Training callbacks: how the loop talks to the outside (MLflow logging, Tune reporting, tests).

The loop knows nothing about MLflow or Ray; anything that wants to observe training implements some
of the :class:`Callback` hooks. All hooks are optional, so a callback can be any object with the
methods it cares about (duck typing), e.g. ``rdml.tracking.RunLogger``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

HOOKS = ("on_train_start", "on_step", "on_epoch_end", "on_checkpoint", "on_train_end")


@runtime_checkable
class Callback(Protocol):
    """Observer of a training run. Every method is optional; missing ones are skipped."""

    def on_train_start(self, cfg: Any) -> None: ...

    def on_step(self, step: int, stats: dict[str, float]) -> None: ...

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, path: Path) -> None: ...

    def on_train_end(self, result: Any) -> None: ...


class CallbackList:
    """Dispatches each hook to every callback that defines it, in order."""

    def __init__(self, callbacks: Sequence[object] = ()) -> None:
        self.callbacks = list(callbacks)

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if callable(fn):
                fn(*args)

    def on_train_start(self, cfg: Any) -> None:
        self._call("on_train_start", cfg)

    def on_step(self, step: int, stats: dict[str, float]) -> None:
        self._call("on_step", step, stats)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self._call("on_epoch_end", epoch, metrics)

    def on_checkpoint(self, path: Path) -> None:
        self._call("on_checkpoint", path)

    def on_train_end(self, result: Any) -> None:
        self._call("on_train_end", result)
