"""One EAT member: its model, loss, optimiser, data, and the adversarial training step.

A :class:`Member` knows nothing about Ray: the in-process ensemble (:mod:`rdml.ensemble.local`),
the Ray actors (:mod:`rdml.distributed.eat`) and the tests all drive the same object. Each member
keeps its own torch RNG stream (:meth:`Member.rng`), so members stepped in turn in one process
draw exactly the random numbers they would draw in their own actor processes.

A step is split into phases so the coordinator can put the exchange between them:

1. :meth:`draw` the next batch of the member's data subset;
2. craft adversarial examples: white-box on its own loss (:meth:`craft_own`; modes ``none`` and
   ``cross_member``), or set from an ensemble-gradient PGD run on all members' batches
   (:meth:`set_adversarial`; mode ``ensemble_gradient``);
3. :meth:`update` with L_m = w * L(f_m(x)) + (1 - w) * L(f_m(x_adv)) (w = ``ensemble.clean_weight``);
   in ``cross_member`` the adversarial term is the mean of the member's own adversarial loss and the
   loss on examples transferred from the other members' statistics (:meth:`transferred_batch`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rdml.attacks.pgd import Budget, frozen_eval, pgd
from rdml.config import ExperimentConfig
from rdml.data import SubsetDataset, make_train_loader
from rdml.ensemble.objectives import per_sample_stats
from rdml.ensemble.stats import RobustnessStats, make_stats, quantise_perturbation
from rdml.losses import build_loss
from rdml.models import build_model
from rdml.train.optim import build_optimizer, build_scheduler
from rdml.train.seeding import derive_seed

SELF_TRANSFER_MODES = ("ensemble_gradient", "cross_member", "none")


def member_seed(cfg: ExperimentConfig, member_id: int) -> int:
    """Member 0 uses ``train.seed`` itself (so M=1 reduces to single-model training)."""
    return int(cfg.train.seed) + 1000 * int(member_id)


def step_generator(cfg: ExperimentConfig, step: int) -> torch.Generator:
    """PGD random-start generator of an ensemble step, identical in every member process."""
    return torch.Generator().manual_seed(derive_seed(cfg.train.seed, step, 7))


class Member:
    """Model + loss + optimiser + data subset + adversarial step of one ensemble member."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        member_id: int,
        train_set,
        indices: np.ndarray,
        device: str | torch.device = "cpu",
    ) -> None:
        self.cfg = cfg
        self.id = int(member_id)
        self.device = torch.device(device)
        self.train_set = train_set
        self.indices = np.asarray(indices, dtype=np.int64)
        self.subset = SubsetDataset(train_set, self.indices)
        self.seed = member_seed(cfg, member_id)
        self.mode = cfg.ensemble.self_transfer
        self.budget = Budget.from_config(cfg.defense.pgd)
        self._rng_state = torch.Generator().manual_seed(self.seed).get_state()
        with self.rng():
            self.model = build_model(cfg.model, train_set.in_channels, train_set.image_size).to(self.device)
            self.loss = build_loss(cfg.loss, train_set.num_classes, self.model.embedding_dim).to(self.device)
        self.optimizer = build_optimizer(cfg, self.model, self.loss)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.epoch = 0
        self.pos = 0  # batches drawn in the current epoch
        self.steps = 0  # updates taken
        self.stats_reads = 0  # records of other members read (stays 0 in mode `none`)
        self._iter: Iterator | None = None
        self._batch: tuple[Tensor, Tensor, Tensor] | None = None
        self._x_adv: Tensor | None = None
        self._own_stats: dict[str, Tensor] | None = None
        self.timing: dict[str, float] = {}

    # ------------------------------------------------------------------ randomness
    @contextlib.contextmanager
    def rng(self) -> Iterator[None]:
        """Swap in this member's torch RNG stream for the duration of the block."""
        saved = torch.get_rng_state()
        torch.set_rng_state(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(saved)

    # ------------------------------------------------------------------ data
    def steps_per_epoch(self) -> int:
        """Batches in one pass over this member's subset."""
        return len(make_train_loader(self.subset, self.cfg.data, seed=self.seed, epoch=0))

    def _loader_iter(self) -> Iterator:
        loader = make_train_loader(self.subset, self.cfg.data, seed=self.seed, epoch=self.epoch)
        it = iter(loader)
        for _ in range(self.pos):  # resume mid-epoch: skip what was already drawn
            next(it)
        return it

    def draw(self) -> tuple[Tensor, Tensor, Tensor]:
        """The next (images, labels, sample ids) of the member's subset; a new epoch when exhausted."""
        # A DataLoader iterator draws a base seed from torch's global RNG; batches are a function of
        # (seed, epoch) alone, so that draw is discarded to keep the member's stream (and resumes) exact.
        with torch.random.fork_rng(devices=[]):
            if self._iter is None:
                self._iter = self._loader_iter()
            try:
                batch = next(self._iter)
            except StopIteration:
                self.epoch += 1
                self.pos = 0
                if self.scheduler is not None:
                    self.scheduler.step()
                self._iter = self._loader_iter()
                batch = next(self._iter)
        self.pos += 1
        x, y, ids = batch
        self._batch = (x.to(self.device), y.to(self.device), ids.to(torch.int64))
        self._x_adv = None
        return self._batch

    @property
    def batch(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._batch is None:
            raise RuntimeError("draw() a batch first")
        return self._batch

    # ------------------------------------------------------------------ crafting
    def own_objective(self, labels: Sequence[Tensor], sizes: Sequence[int]):
        """Minus this member's chunk losses (see :func:`rdml.ensemble.objectives.chunk_losses`)."""
        from rdml.ensemble.objectives import chunk_losses

        def objective(x: Tensor) -> Tensor:
            with self.rng():
                return -chunk_losses(self.model, self.loss, x, labels, sizes)

        return objective

    def craft_own(self, step: int) -> RobustnessStats:
        """White-box PGD on the member's own loss (modes ``none``, ``cross_member``); returns its record."""
        x, y, _ = self.batch
        t0 = time.perf_counter()
        with frozen_eval(self.model, self.loss):
            result = pgd(self.own_objective([y], [len(y)]), x, self.budget, generator=step_generator(self.cfg, step))
        self.timing["craft"] = time.perf_counter() - t0
        return self.set_adversarial(result.x_adv, result.iterations, step)

    def set_adversarial(self, x_adv: Tensor, iterations: Tensor, step: int) -> RobustnessStats:
        """Adopt adversarial examples for the current batch and compute this step's record."""
        x, y, ids = self.batch
        self._x_adv = x_adv.detach().to(self.device)
        with frozen_eval(self.model), torch.no_grad():
            emb_adv, emb_clean = self.model(self._x_adv), self.model(x)
        stats = per_sample_stats(emb_adv, emb_clean, y, self.cfg.loss.margin)
        self._own_stats = stats
        perturbation = None
        if self.mode == "cross_member":
            perturbation = quantise_perturbation(self._x_adv - x, self.budget.eps)
        return make_stats(self.id, step, ids, y, stats["adv_loss"], stats["hardness"], stats["shift"],
                          iterations, perturbation=perturbation)

    # ------------------------------------------------------------------ self-transfer
    def _group_size(self) -> int:
        return 2 if self.cfg.data.batch_sampler == "pairs" else int(self.cfg.data.m_per_class)

    def transferred_batch(self, others: Sequence[RobustnessStats]) -> tuple[Tensor, Tensor]:
        """Examples crafted by the other members, re-applied to the clean images, chosen by hardness.

        The candidates are the other members' adversarial batches (clean image reloaded by sample id
        + their de-quantised perturbation, clipped to [0,1]). Class groups (SPC-2 pairs, or the
        m-per-class groups) are kept intact so any metric loss applies; as many groups as the
        member's own batch holds are drawn without replacement with probability
        softmax(group mean adversarial loss / ``ensemble.transfer_temperature``): the ensemble's
        per-sample statistics decide which transferred examples the member trains on.
        """
        self.stats_reads += len(others)
        g = self._group_size()
        images, labels, scores = [], [], []
        for rec in others:
            rec.check()
            delta = rec.delta()
            clean = torch.stack([self.train_set[int(i)][0] for i in rec.sample_ids])
            x_hat = (clean + delta).clamp(0.0, 1.0)
            n = (len(rec.sample_ids) // g) * g
            images.append(x_hat[:n].view(n // g, g, *x_hat.shape[1:]))
            labels.append(torch.from_numpy(rec.labels[:n]).view(n // g, g))
            scores.append(torch.from_numpy(rec.adv_loss[:n].astype(np.float32)).view(n // g, g).mean(1))
        images_t, labels_t, scores_t = torch.cat(images), torch.cat(labels), torch.cat(scores)
        k = min(len(self.batch[1]) // g, len(scores_t))
        probs = torch.softmax(scores_t / self.cfg.ensemble.transfer_temperature, dim=0)
        with self.rng():
            chosen = torch.multinomial(probs, k, replacement=False)
        x_t = images_t[chosen].flatten(0, 1).to(self.device)
        y_t = labels_t[chosen].flatten(0, 1).to(self.device)
        return x_t, y_t

    # ------------------------------------------------------------------ update
    def update(self, others: Sequence[RobustnessStats] = ()) -> dict[str, float]:
        """One optimiser step on L_m (module doc). ``others`` is read only in ``cross_member``."""
        if self._x_adv is None:
            raise RuntimeError("craft adversarial examples before update()")
        if others and self.mode != "cross_member":
            raise ValueError(f"self_transfer={self.mode} must not receive other members' statistics")
        x, y, _ = self.batch
        w = self.cfg.ensemble.clean_weight
        t0 = time.perf_counter()
        transferred = self.transferred_batch(others) if others else None
        self.model.train()
        self.loss.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.rng():
            adv_loss = self.loss(self.model(self._x_adv), y)
            metrics = {"loss_adv": float(adv_loss.detach())}
            if transferred is not None:
                t_loss = self.loss(self.model(transferred[0]), transferred[1])
                metrics["loss_transfer"] = float(t_loss.detach())
                adv_loss = 0.5 * (adv_loss + t_loss)
            total = (1.0 - w) * adv_loss
            if w > 0:
                clean_loss = self.loss(self.model(x), y)
                metrics["loss_clean"] = float(clean_loss.detach())
                total = total + w * clean_loss
        if not torch.isfinite(total):
            from rdml.errors import TrainingDivergedError

            raise TrainingDivergedError(
                f"member {self.id}: loss became {float(total)} at step {self.steps}; lower train.lr or "
                "resume from the last ensemble checkpoint"
            )
        total.backward()
        if self.cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *self.loss.parameters()],
                                           self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.timing["update"] = time.perf_counter() - t0
        metrics["loss"] = float(total.detach())
        if self._own_stats is not None:
            metrics["adv_hinge"] = float(self._own_stats["adv_loss"].mean())
            metrics["shift"] = float(self._own_stats["shift"].mean())
        return metrics

    # ------------------------------------------------------------------ state
    def model_state(self) -> dict[str, Tensor]:
        """The model weights on CPU (for the driver's :class:`EnsembleModel`)."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this member is (checkpoints)."""
        return {
            "member": self.id,
            "model": self.model_state(),
            "loss": {k: v.detach().cpu() for k, v in self.loss.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": self._rng_state.clone(),
            "epoch": self.epoch,
            "pos": self.pos,
            "steps": self.steps,
            "indices": self.indices,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["member"]) != self.id:
            raise ValueError(f"checkpoint of member {state['member']} loaded into member {self.id}")
        if not np.array_equal(np.asarray(state["indices"]), self.indices):
            raise ValueError(f"member {self.id}: checkpoint data subset differs (different ensemble.parts/split/seed)")
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._rng_state = state["rng"].clone()
        self.epoch, self.pos, self.steps = int(state["epoch"]), int(state["pos"]), int(state["steps"])
        self._iter, self._batch, self._x_adv = None, None, None
