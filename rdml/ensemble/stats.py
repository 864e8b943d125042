"""The robustness-statistics record a member publishes every step (EAT's self-transfer currency).

One :class:`RobustnessStats` per member and step, typed, versioned and compact. Members ``ray.put``
it; other members fetch it from the object store. Everything is a numpy array, so Ray stores it
zero-copy and a record can be fetched without unpickling tensors.

Fields (n = samples in the record):

================  ==========================  ===================================================
field             dtype / shape               meaning
================  ==========================  ===================================================
schema            int                         :data:`SCHEMA_VERSION`; readers refuse others
member            int                         publishing member id
step              int                         ensemble step (and ``pgd_iter`` for gradients)
sample_ids        int64 [n]                   global training-set indices (parent dataset)
labels            int64 [n]                   training labels of those samples
adv_loss          float16 [n]                 per-sample adversarial loss (batch-hard triplet hinge
                                              on the adversarial embeddings, loss-agnostic)
hardness          float16 [n]                 d(a,p) - d(a,n), hardest positive/negative, adversarial
shift             float16 [n]                 ||f(x_adv) - f(x)||_2 (embedding shift)
iterations        int16 [n]                   PGD iterations taken per sample
perturbation      int8 [n,C,H,W] or None      ``cross_member``: delta quantised as
                                              round(delta / eps * 127) (or float16, see
                                              ``perturbation_scale == 0``)
input_grad        float16 [n,C,H,W] or None   ``ensemble_gradient``: the member's input gradient
                                              at one PGD iteration (one record per iteration)
================  ==========================  ===================================================

:func:`bytes_per_step` gives the size of what one member publishes per ensemble step in each mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

SCHEMA_VERSION = 1
_PER_SAMPLE_BYTES = 8 + 8 + 2 + 2 + 2 + 2  # ids, labels, adv_loss, hardness, shift, iterations
_HEADER_BYTES = 64  # schema, member, step, pgd_iter, scale (rounded up; pickling adds a little)


@dataclass
class RobustnessStats:
    """Per-member, per-step robustness statistics (see the module doc for the fields)."""

    member: int
    step: int
    sample_ids: np.ndarray
    labels: np.ndarray
    adv_loss: np.ndarray
    hardness: np.ndarray
    shift: np.ndarray
    iterations: np.ndarray
    perturbation: np.ndarray | None = None
    perturbation_scale: float = 0.0
    input_grad: np.ndarray | None = None
    pgd_iter: int = -1
    schema: int = field(default=SCHEMA_VERSION)

    def __post_init__(self) -> None:
        n = len(self.sample_ids)
        for name in ("labels", "adv_loss", "hardness", "shift", "iterations"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"RobustnessStats.{name} has {len(getattr(self, name))} entries, expected {n}")

    @property
    def nbytes(self) -> int:
        """Payload bytes (arrays plus a fixed header)."""
        total = _HEADER_BYTES
        for name in ("sample_ids", "labels", "adv_loss", "hardness", "shift", "iterations",
                     "perturbation", "input_grad"):
            arr = getattr(self, name)
            if arr is not None:
                total += arr.nbytes
        return total

    def check(self) -> RobustnessStats:
        """Refuse a record written by an incompatible version."""
        if self.schema != SCHEMA_VERSION:
            raise ValueError(f"robustness statistics schema {self.schema}, this rdml reads {SCHEMA_VERSION}")
        return self

    def delta(self) -> Tensor:
        """The perturbation as a float32 tensor (de-quantised)."""
        if self.perturbation is None:
            raise ValueError(f"member {self.member} published no perturbation at step {self.step}")
        p = torch.from_numpy(np.array(self.perturbation))
        if self.perturbation_scale > 0:
            return p.float() * (self.perturbation_scale / 127.0)
        return p.float()


def quantise_perturbation(delta: Tensor, eps: float, dtype: str = "int8") -> tuple[np.ndarray, float]:
    """Compress a perturbation: int8 in units of eps/127 (error <= eps/254), or float16."""
    if dtype == "int8" and eps > 0:
        q = torch.round(delta.detach().float().cpu() / eps * 127.0).clamp(-127, 127).to(torch.int8)
        return q.numpy(), float(eps)
    return delta.detach().cpu().to(torch.float16).numpy(), 0.0


def _f16(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().to(torch.float16).numpy()


def make_stats(
    member: int,
    step: int,
    sample_ids: Tensor,
    labels: Tensor,
    adv_loss: Tensor,
    hardness: Tensor,
    shift: Tensor,
    iterations: Tensor,
    perturbation: tuple[np.ndarray, float] | None = None,
    input_grad: Tensor | None = None,
    pgd_iter: int = -1,
) -> RobustnessStats:
    """Build a record from tensors (moved to CPU and compressed)."""
    pert, scale = perturbation if perturbation is not None else (None, 0.0)
    return RobustnessStats(
        member=int(member),
        step=int(step),
        sample_ids=sample_ids.detach().cpu().to(torch.int64).numpy(),
        labels=labels.detach().cpu().to(torch.int64).numpy(),
        adv_loss=_f16(adv_loss),
        hardness=_f16(hardness),
        shift=_f16(shift),
        iterations=iterations.detach().cpu().to(torch.int16).numpy(),
        perturbation=pert,
        perturbation_scale=scale,
        input_grad=None if input_grad is None else _f16(input_grad),
        pgd_iter=pgd_iter,
    )


def bytes_per_step(
    batch: int, channels: int, image_size: int, mode: str, members: int = 3, pgd_steps: int = 8,
    perturbation_dtype: str = "int8",
) -> dict[str, int]:
    """Bytes one member publishes per ensemble step, by mode (computed, nothing is run).

    * ``none``: the per-sample scalars only (logged, never read by other members);
    * ``cross_member``: scalars + the quantised perturbation of its batch;
    * ``ensemble_gradient``: the clean batch (float32 images, once per step, so every member can
      compute gradients on it) + per PGD iteration the member's float16 input gradients on *all*
      members' batches (``members * batch`` samples) + the scalars.
    """
    pixels = channels * image_size * image_size
    scalars = _HEADER_BYTES + batch * _PER_SAMPLE_BYTES
    out = {"scalars": scalars, "perturbation": 0, "batch_images": 0, "gradients": 0}
    if mode == "cross_member":
        out["perturbation"] = batch * pixels * (1 if perturbation_dtype == "int8" else 2)
    elif mode == "ensemble_gradient":
        out["batch_images"] = batch * pixels * 4 + batch * 16
        out["gradients"] = pgd_steps * (_HEADER_BYTES + members * batch * (pixels * 2 + 2))
    elif mode != "none":
        raise ValueError(f"unknown self-transfer mode {mode!r}")
    out["total"] = sum(out.values())
    return out
