"""Clean interrupts: SIGINT/SIGTERM ask training to stop at the next step, not to die mid-write.

Why not Python's default (``KeyboardInterrupt`` wherever the main thread happens to be) or Ray's (its
SIGTERM handler calls ``sys.exit`` inside ``ray.get``; Ray Train's SIGINT handler aborts the workers):
both lose the state of the step that was running, and under Ray the workers never hear of a Ctrl-C at
all. Instead :class:`StopSignals` records the first signal and sets a flag; the training loop
(:func:`rdml.train.fit`, through its ``should_stop`` argument) checks the flag between steps, writes a
checkpoint of the current state (it resumes exactly, mid-epoch included) and returns a result marked
``stopped``; the command then marks the MLflow run KILLED, prints one line with the resume command and
exits ``128 + signal`` (130 for SIGINT, 143 for SIGTERM). A second signal stops at once
(:class:`Interrupted` is raised in the main thread); the last checkpoint written is kept (writes are
atomic).

No Ray here: the Ray path forwards the flag to its workers (:mod:`rdml.distributed.train_ray`).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training was stopped by a signal (a KeyboardInterrupt, so generic handlers treat it as one)."""

    def __init__(self, signum: int = signal.SIGINT, message: str = "") -> None:
        super().__init__(message or f"interrupted by {signal_name(signum)}")
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The shell convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Turns SIGINT/SIGTERM into a stop request (a flag), the second one into :class:`Interrupted`.

    Use as a context manager around the work (the previous handlers come back on exit); ``install()``
    may be called again to take the handlers back from code that replaced them (``ray.init`` installs
    its own SIGTERM handler). ``notice`` is printed to stderr on the first signal. Handlers can only be
    installed from the main thread; elsewhere this object is an inert flag (``request()`` still works).
    """

    def __init__(self, notice: str | None = None) -> None:
        self.signum: int | None = None
        self.event = threading.Event()
        self.notice = notice
        self._previous: dict[int, Any] = {}

    # -- the flag ---------------------------------------------------------------------------------
    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def __call__(self) -> bool:
        """The ``should_stop`` callable :func:`rdml.train.fit` takes."""
        return self.event.is_set()

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask for a stop as a signal would (tests, or a caller that has its own reason to stop)."""
        if self.signum is None:
            self.signum = int(signum)
        self.event.set()

    def check(self) -> None:
        """Raise :class:`Interrupted` if a stop was requested (between stages, before training starts)."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum if self.signum is not None else signal.SIGINT)

    # -- the handlers -----------------------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            raise Interrupted(signum, f"{signal_name(signum)} again: stopping at once")
        self.request(signum)
        if self.notice:
            print(self.notice.format(signal=signal_name(signum)), file=sys.stderr, flush=True)

    def install(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            current = signal.getsignal(sig)
            if current != self._handle:
                self._previous.setdefault(sig, current)
                signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
