"""One line per finished epoch: the progress report that reads well in a log.

A per-step tqdm bar is right in a terminal (``rdml train --no-ray``) and wrong in a log: under Ray every
redraw of a worker's bar becomes a line of the driver's output. Ray workers therefore train without the
bar and rank 0 prints this line instead (Ray forwards it once, prefixed with the worker's name); the
in-process path prints it too, below its bar, so both paths leave the same record.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


class EpochLine:
    """Training callback: ``epoch 3/8  loss 0.0421  R@1 0.8650  12.3 s`` after every epoch."""

    def __init__(self, epochs: int, file: TextIO | None = None) -> None:
        self.epochs = int(epochs)
        self.file = file

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        parts = [f"epoch {epoch}/{self.epochs}"]
        if "train/loss" in metrics:
            parts.append(f"loss {metrics['train/loss']:.4f}")
        if "eval/recall@1" in metrics:
            parts.append(f"R@1 {metrics['eval/recall@1']:.4f}")
        if "train/epoch_time_s" in metrics:
            parts.append(f"{metrics['train/epoch_time_s']:.1f} s")
        # write, not print: Ray Train patches print() in its workers to log *and* echo (two lines each)
        stream = self.file or sys.stdout
        stream.write("  ".join(parts) + "\n")
        stream.flush()
