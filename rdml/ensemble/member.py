"""One EAT member: a single model trained exactly as ``rdml train`` trains it, plus a self-transfer strategy.

A member's update *is* the training loop's step (:func:`rdml.train.fit`): ``Defense.train_step`` of
the configured defense (none, est, act, hm with any schedule and ICS, panum, minmax), the loss checked
for NaN/inf, back-propagated, clipped, one optimiser step; the epoch's randomness reseeded from
``(seed, epoch)`` as ``fit`` reseeds it, the scheduler stepped at each epoch end. With one member on
the whole training set (``ensemble.members=1``, ``ensemble.parts=1``) it takes the same steps as
``rdml train`` with the same seed (``tests/test_ensemble_modes.py``).

Self-transfer never adds a second training step: the member's strategy
(:mod:`rdml.ensemble.transfer`) reads the other members' records and sets the step's hooks
(:class:`rdml.defenses.base.StepState` ``adversary`` and ``extra``): what the defense's adversary
optimises and which extra examples the step trains on.

The exchange (what a backend does, :mod:`rdml.ensemble.exchange`): before every step each member
:meth:`publish` es a record, then :meth:`step` receives the records of all the other members. A
member knows nothing about Ray: the in-process backend (:class:`rdml.ensemble.local.LocalEnsemble`)
and the Ray actors (:mod:`rdml.distributed.eat`) drive the same object.

Randomness: member m is seeded with ``train.seed + 1000 m`` and keeps its own global RNG state
(python, numpy, torch: :meth:`rng`), swapped in for the duration of each of its steps, so members
stepped in turn in one process draw exactly what they draw in their own processes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rdml.config import ExperimentConfig
from rdml.data import SubsetDataset, make_train_loader
from rdml.defenses import build_defense
from rdml.defenses.base import StepState
from rdml.errors import ConfigError, TrainingDivergedError
from rdml.losses import build_loss
from rdml.models import build_model
from rdml.train.optim import build_optimizer, build_scheduler
from rdml.train.seeding import derive_seed, rng_state, seed_everything, set_rng_state


def member_seed(cfg: ExperimentConfig, member_id: int) -> int:
    """Member 0 uses ``train.seed`` itself (so one member reduces to single-model training)."""
    return int(cfg.train.seed) + 1000 * int(member_id)


def pass_length(cfg: ExperimentConfig, train_set, indices: np.ndarray, member_id: int) -> int:
    """Batches in one pass of member ``member_id`` over its subset."""
    subset = SubsetDataset(train_set, indices)
    return len(make_train_loader(subset, cfg.data, seed=member_seed(cfg, member_id), epoch=0))


def ensemble_steps_per_epoch(cfg: ExperimentConfig, pass_lengths: Sequence[int]) -> int:
    """Steps per ensemble epoch: ``ensemble.steps_per_epoch``, else ``train.max_steps_per_epoch`` (capped at a
    pass, as ``rdml train`` caps it), else the shortest member's pass. Every member takes that many steps of its
    own loader per epoch, so all members' epochs (seeds, schedulers) stay aligned."""
    shortest = min(pass_lengths)
    wanted = cfg.ensemble.steps_per_epoch
    if wanted is not None:
        if wanted > shortest:
            raise ConfigError(
                f"ensemble.steps_per_epoch={wanted} is more than a member's pass over its data subset "
                f"({shortest} batches of {2 * cfg.data.batch_pairs if cfg.data.batch_sampler == 'pairs' else 'm-per-class'} "
                f"images); set ensemble.steps_per_epoch <= {shortest} or leave it unset (one pass per epoch)"
            )
        return int(wanted)
    if cfg.train.max_steps_per_epoch is not None:
        return min(shortest, int(cfg.train.max_steps_per_epoch))
    return shortest


class Member:
    """Model, loss, defense, optimiser and data subset of one member; steps like ``rdml train`` (module doc)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        member_id: int,
        train_set,
        indices: np.ndarray,
        device: str | torch.device = "cpu",
        *,
        steps_per_epoch: int,
        transfer: type | None = None,
    ) -> None:
        from rdml.ensemble.transfer import get_transfer

        self.cfg = cfg
        self.id = int(member_id)
        self.device = torch.device(device)
        self.train_set = train_set
        self.indices = np.asarray(indices, dtype=np.int64)
        self.subset = SubsetDataset(train_set, self.indices)
        self.seed = member_seed(cfg, member_id)
        self.steps_per_epoch = int(steps_per_epoch)
        outside = rng_state()
        try:  # what fit does before the first epoch: seed, then build model, loss (proxies), defense
            seed_everything(derive_seed(self.seed))
            self.model = build_model(cfg.model, train_set.in_channels, train_set.image_size).to(self.device)
            self.loss = build_loss(cfg.loss, train_set.num_classes, self.model.embedding_dim).to(self.device)
            self.defense = build_defense(cfg.defense, cfg.loss, self.loss)
            self._rng: dict[str, Any] = rng_state()
        finally:
            set_rng_state(outside)
        self.optimizer = build_optimizer(cfg, self.model, self.loss)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.transfer = (transfer or get_transfer(cfg.ensemble.self_transfer))(self)
        self.global_step = 0  # updates taken
        self.stats_reads = 0  # records of other members read (stays 0 in mode `none`)
        self.generator: torch.Generator | None = None
        self._it: Iterator | None = None
        self._resume: dict[str, Any] | None = None  # RNG states to restore after reopening an epoch mid-way
        self.timing: dict[str, float] = {}

    # ------------------------------------------------------------------ randomness
    @contextlib.contextmanager
    def rng(self) -> Iterator[None]:
        """Swap in this member's global RNG state (python, numpy, torch) for the duration of the block."""
        outside = rng_state()
        set_rng_state(self._rng)
        try:
            yield
        finally:
            self._rng = rng_state()
            set_rng_state(outside)

    # ------------------------------------------------------------------ data
    def _open_epoch(self, epoch: int, pos: int) -> None:
        """Reseed and build epoch ``epoch``'s loader, positioned after ``pos`` batches (as ``fit`` does)."""
        seed_everything(derive_seed(self.seed, epoch, 0))
        self.generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 0, 1))
        loader = make_train_loader(self.subset, self.cfg.data, seed=self.seed, epoch=epoch, skip=pos)
        self._it = iter(loader)  # draws a base seed from the global RNG: restore the saved states after it
        if self._resume is not None and pos > 0:
            set_rng_state(self._resume["rng"])
            self.generator.set_state(self._resume["generator"])
        self._resume = None

    def _next_batch(self, epoch: int, pos: int) -> tuple[Tensor, Tensor, Tensor]:
        if pos == 0 or self._it is None:
            self._open_epoch(epoch, pos)
        try:
            x, y, ids = next(self._it)
        except StopIteration:  # ensemble_steps_per_epoch keeps every epoch within one pass
            raise RuntimeError(f"member {self.id}: its loader ran out at step {pos} of epoch {epoch}") from None
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), ids.to(torch.int64)

    # ------------------------------------------------------------------ the exchange and the step
    def publish(self) -> Any:
        """The record this member shares with the others before its next step (None: nothing to share)."""
        record = self.transfer.publish()
        if record is not None:
            self.timing["published_bytes"] = float(record.nbytes)
        return record

    def step(self, step: int, others: Sequence[Any] = ()) -> dict[str, float]:
        """One training step (ensemble step ``step``) given the other members' records; returns its statistics."""
        if step != self.global_step:
            raise RuntimeError(f"member {self.id} is at step {self.global_step}, asked to take step {step}")
        records = [r for r in others if r is not None]
        self.stats_reads += len(records)
        t0 = time.perf_counter()
        epochs = max(self.cfg.train.epochs, 1)
        epoch, pos = divmod(step, self.steps_per_epoch)
        with self.rng():
            self.model.train()  # fit trains in train mode; an evaluation in between may have left eval mode
            self.loss.train()
            x, y, ids = self._next_batch(epoch, pos)
            state = StepState(step=step, epoch=epoch, progress=(epoch + pos / self.steps_per_epoch) / epochs,
                              generator=self.generator)
            self.transfer.hooks(records, state, (x, y, ids))
            out = self.defense.train_step(self.model, x, y, state)
            loss_value = out.loss.detach()
            if not bool(torch.isfinite(loss_value)):
                raise TrainingDivergedError(
                    f"member {self.id}: the loss became {float(loss_value)} at step {step} (epoch {epoch}); lower "
                    f"train.lr (now {self.cfg.train.lr:g}) or set train.grad_clip=1.0, and resume from the last "
                    "ensemble checkpoint (`rdml ensemble --resume RUN_DIR --set train.lr=...`)"
                )
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if self.cfg.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
            self.optimizer.step()
            self.transfer.finish()
        self.global_step += 1
        if pos + 1 == self.steps_per_epoch:  # the epoch ends: as fit, step the scheduler, check the weights
            self._it = None
            if self.scheduler is not None:
                self.scheduler.step()
            if not all(bool(torch.isfinite(p).all()) for p in self.params):
                raise TrainingDivergedError(
                    f"member {self.id}: the weights contain NaN/inf after epoch {epoch}; lower train.lr and resume "
                    "from the last ensemble checkpoint"
                )
        self.timing["step"] = time.perf_counter() - t0
        return {**{k: float(v) for k, v in out.stats.items()}, "loss": float(loss_value), "passes": float(out.passes)}

    # ------------------------------------------------------------------ state
    def model_state(self) -> dict[str, Tensor]:
        """The model weights on CPU (for the driver's :class:`EnsembleModel`)."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this member is (checkpoints).

        Tensors and plain values only (the data indices as an int64 tensor), so member files load with
        ``torch.load(weights_only=True)``.
        """
        return {
            "member": self.id,
            "model": self.model_state(),
            "loss": {k: v.detach().cpu() for k, v in self.loss.state_dict().items()},
            "defense": self.defense.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": self._rng,
            "generator": None if self.generator is None else self.generator.get_state(),
            "steps": self.global_step,
            "indices": torch.from_numpy(self.indices.copy()),
            "transfer": self.transfer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["member"]) != self.id:
            raise ValueError(f"checkpoint of member {state['member']} loaded into member {self.id}")
        if "defense" not in state or not isinstance(state.get("rng"), dict):
            raise ConfigError(f"member {self.id}: this member file was written by an older rdml (members trained "
                              "plain min-max whatever defense.name said); it can be evaluated, not resumed: start a "
                              "new `rdml ensemble` run")
        indices = state["indices"]
        if not np.array_equal(indices.numpy() if isinstance(indices, Tensor) else np.asarray(indices), self.indices):
            raise ValueError(f"member {self.id}: checkpoint data subset differs (different ensemble.parts/split/seed)")
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.defense.load_state_dict(state["defense"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._rng = state["rng"]
        self.global_step = int(state["steps"])
        self.transfer.load_state_dict(state.get("transfer") or {})
        self._it = None
        self._resume = {"rng": state["rng"], "generator": state["generator"]} if state.get("generator") is not None \
            else None
