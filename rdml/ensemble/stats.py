"""The records members exchange (EAT's self-transfer currency), typed, versioned and compact.

:class:`RobustnessStats` (``cross_member``): one per member and step, the examples the member's
adversary crafted and their per-sample robustness statistics. Everything is a numpy array, so Ray
stores it zero-copy and a record can be fetched without unpickling tensors.

================  ==========================  ===================================================
field             dtype / shape               meaning
================  ==========================  ===================================================
schema            int                         :data:`SCHEMA_VERSION`; readers refuse others
member            int                         publishing member id
step              int                         ensemble step the examples were crafted at
sample_ids        int64 [n]                   global training-set indices (parent dataset) of the
                                              images the crafted rows perturb
labels            int64 [n]                   training labels of those samples
adv_loss          float16 [n]                 per-row adversarial loss (batch-hard triplet hinge
                                              on the adversarial embeddings, loss-agnostic)
hardness          float16 [n]                 d(a,p) - d(a,n), hardest positive/negative, adversarial
shift             float16 [n]                 ||f(x_adv) - f(x)||_2 (embedding shift)
iterations        int16 [n]                   PGD iterations taken per row
perturbation      int8 [n,C,H,W] or None      delta quantised as round(delta / eps * 127) (or
                                              float16, see ``perturbation_scale == 0``)
input_grad        float16 [n,C,H,W] or None   unused by the built-in modes (kept for schema 1)
================  ==========================  ===================================================

:class:`MemberSnapshot` (``ensemble_gradient``): a member's weights (model and loss state, float32,
as numpy arrays) at the start of a step, so every other member can evaluate that member's loss
gradient on its *own* batch locally.

:func:`gradient_allgather_bytes` and :func:`gradient_reduce_bytes` compute what the earlier
per-iteration gradient exchanges of ``ensemble_gradient`` would move (for ``bench/eat_scaling.py``'s
before/after table); each strategy computes its own bytes (:meth:`SelfTransfer.bytes_per_step`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

SCHEMA_VERSION = 1
SNAPSHOT_SCHEMA = 1
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


def concat_stats(records: list[RobustnessStats]) -> RobustnessStats | None:
    """Several records of the same member and step as one (a defense that crafts twice in a step)."""
    if not records:
        return None
    if len(records) == 1:
        return records[0]
    first = records[0]

    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(r, name) for r in records]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    return RobustnessStats(first.member, first.step, *(cat(n) for n in ("sample_ids", "labels", "adv_loss",
                                                                         "hardness", "shift", "iterations")),
                           perturbation=cat("perturbation"), perturbation_scale=first.perturbation_scale)


def stats_to_state(rec: RobustnessStats | None) -> dict:
    """A record as tensors and plain values (member checkpoints load with ``weights_only=True``)."""
    if rec is None:
        return {}
    out: dict = {"member": rec.member, "step": rec.step, "scale": float(rec.perturbation_scale), "schema": rec.schema}
    for name in ("sample_ids", "labels", "adv_loss", "hardness", "shift", "iterations", "perturbation"):
        value = getattr(rec, name)
        out[name] = None if value is None else torch.from_numpy(np.array(value))
    return out


def stats_from_state(state: dict) -> RobustnessStats | None:
    """The inverse of :func:`stats_to_state`."""
    if not state:
        return None

    def arr(name: str) -> np.ndarray | None:
        value = state.get(name)
        return None if value is None else value.numpy()

    return RobustnessStats(int(state["member"]), int(state["step"]), arr("sample_ids"), arr("labels"),
                           arr("adv_loss"), arr("hardness"), arr("shift"), arr("iterations"),
                           perturbation=arr("perturbation"), perturbation_scale=float(state["scale"]),
                           schema=int(state["schema"]))


@dataclass
class MemberSnapshot:
    """A member's weights at the start of a step (model state and loss state, e.g. PAL proxies), as numpy arrays."""

    member: int
    step: int
    model: dict[str, np.ndarray]
    loss: dict[str, np.ndarray]
    schema: int = field(default=SNAPSHOT_SCHEMA)

    @property
    def nbytes(self) -> int:
        return _HEADER_BYTES + sum(a.nbytes for a in (*self.model.values(), *self.loss.values()))

    def check(self) -> MemberSnapshot:
        if self.schema != SNAPSHOT_SCHEMA:
            raise ValueError(f"member snapshot schema {self.schema}, this rdml reads {SNAPSHOT_SCHEMA}")
        return self

    def load_into(self, model: torch.nn.Module, loss: torch.nn.Module) -> None:
        """Copy the weights into ``model`` and ``loss`` (replicas of the publishing member)."""
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.model.items()})
        loss.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.loss.items()})


def snapshot(member: int, step: int, model: torch.nn.Module, loss: torch.nn.Module) -> MemberSnapshot:
    """A copy of the weights now (later updates of the live model do not change it)."""

    def arrays(module: torch.nn.Module) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}

    return MemberSnapshot(int(member), int(step), arrays(model), arrays(loss))


def gradient_allgather_bytes(batch: int, channels: int, image_size: int, members: int, pgd_steps: int) -> dict[str, int]:
    """Per member and step, the *earlier* ``ensemble_gradient`` exchange (an all-gather of every input gradient).

    Published: the clean batch (float32) once, then per PGD iteration one float16 record holding the
    member's input gradients on *all* M batches; received: the same from each of the M - 1 others.
    """
    pixels = channels * image_size * image_size
    scalars = _HEADER_BYTES + batch * _PER_SAMPLE_BYTES
    published = scalars + batch * pixels * 4 + batch * 16 + pgd_steps * (_HEADER_BYTES + members * batch * (pixels * 2 + 2))
    return {"published": published, "received": (members - 1) * published}


def gradient_reduce_bytes(batch: int, channels: int, image_size: int, members: int, pgd_steps: int) -> dict[str, int]:
    """Per member and step, a gradient *reduction* (reduce-scatter, then the step direction all-gathered), computed.

    Each member still needs every other batch's current iterate to compute its gradient there, so a
    reduction is two exchanges per PGD iteration: the M - 1 float16 gradient chunks other members
    need (published) and their mean for its own batch (received), then the sign of its batch's mean
    gradient (int8, L-inf) to every member, so all can track every iterate.
    """
    pixels = channels * image_size * image_size
    batch_images = batch * pixels * 4 + batch * 16
    chunk, step_dir = batch * (pixels * 2 + 4), batch * (pixels + 4)
    published = batch_images + pgd_steps * ((members - 1) * chunk + step_dir)
    received = (members - 1) * batch_images + pgd_steps * (members - 1) * (chunk + step_dir)
    return {"published": published, "received": received}
