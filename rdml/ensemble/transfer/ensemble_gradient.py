"""``ensemble_gradient`` (reading A of the spec): each member's adversary optimises the *ensemble's* mean objective.

For member m's batch, the defense's inner maximisation runs on ``(1/M) sum_j J_j(x)``, where ``J_j``
is the defense's own objective built with member j's model (and loss): for ``minmax`` that is the
members' mean metric loss ``(1/M) sum_j L_j(f_j(x'), y)`` (each member's triplets mined once on its
own clean embeddings), for HM the mean hardness objective towards member m's destinations, for EST
the mean embedding shift of every member from its own clean embedding, and so on
(:attr:`rdml.defenses.base.Craft.objective_for`). Its input gradient is the mean of the members'
input gradients. Member m then trains on its crafted batch with its defense's own loss.

The exchange: every member publishes a :class:`~rdml.ensemble.stats.MemberSnapshot` of its weights at
the start of the step (float32, exact); every member loads the others' snapshots into local replicas
and differentiates through all M models on its *own* batch. The arithmetic is the one of an
all-gather of per-iteration input gradients (each member still runs M forward/backward passes per PGD
iteration, M (T + 1) + 1 per step for minmax), but what moves is one set of weights per member and
step instead of 2 (T + 1) gradient exchanges, and no member waits for another inside a step: for
ResNet-18 at 224 with M = 3, 45 MiB published per member and step instead of 836 MiB
(``bench/eat_scaling.py`` prints the table). Both backends compute with the same float32 weights, so
they take identical steps.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rdml.attacks.pgd import PGDResult, frozen_eval, pgd
from rdml.defenses.base import Craft, StepState
from rdml.ensemble.stats import MemberSnapshot, snapshot
from rdml.ensemble.transfer.base import Geometry, SelfTransfer, register


@contextlib.contextmanager
def _quiet_rebuild() -> Iterator[None]:
    """No "training from scratch" warning for replicas: their weights are loaded right away."""
    log = logging.getLogger("rdml.models.resnet")
    before, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = before


class EnsembleAdversary:
    """Runs a :class:`Craft` on the mean of the defense's objective over the members (in member order)."""

    def __init__(self, members: Sequence[tuple[int, nn.Module | None, nn.Module | None]]) -> None:
        self.members = list(members)  # (id, replica model, replica loss); None: the member's own (live) model

    def objective(self, craft: Craft):
        """``(1/M) sum_j J_j(x)``: the craft's own objective for the member itself, ``objective_for`` for the others."""
        terms = [craft.objective if model is None else craft.objective_for(model, loss)
                 for _, model, loss in self.members]
        count = len(terms)

        def objective(x: Tensor) -> Tensor:
            total = terms[0](x)
            for term in terms[1:]:
                total = total + term(x)
            return total / count

        return objective

    def __call__(self, craft: Craft) -> PGDResult:
        replicas = [m for _, model, loss in self.members for m in (model, loss) if m is not None]
        with frozen_eval(*replicas):
            res = pgd(self.objective(craft), craft.x0, craft.budget, done=craft.done, flat_tol=craft.flat_tol,
                      generator=craft.generator)
        res.passes *= len(self.members)  # every PGD iteration is a forward+backward through every member
        return res


@register
class EnsembleGradient(SelfTransfer):
    name = "ensemble_gradient"
    summary: ClassVar[str] = "craft each member's batch against the members' mean objective (weights exchanged)"

    def __init__(self, member: Any) -> None:
        super().__init__(member)
        self._replicas: dict[int, tuple[nn.Module, nn.Module]] = {}

    def publish(self) -> MemberSnapshot:
        m = self.member
        return snapshot(m.id, m.global_step, m.model, m.loss)

    def _replica(self, member_id: int) -> tuple[nn.Module, nn.Module]:
        """A local copy of member ``member_id``'s model and loss (built once; weights loaded every step)."""
        if member_id not in self._replicas:
            from rdml.losses import build_loss
            from rdml.models import build_model

            m = self.member
            data = m.train_set
            with torch.random.fork_rng(devices=[]), _quiet_rebuild():  # the member's own RNG stream is untouched
                model = build_model(m.cfg.model, data.in_channels, data.image_size).to(m.device).eval()
                loss = build_loss(m.cfg.loss, data.num_classes, model.embedding_dim).to(m.device).eval()
            for p in (*model.parameters(), *loss.parameters()):
                p.requires_grad_(False)
            self._replicas[member_id] = (model, loss)
        return self._replicas[member_id]

    def hooks(self, others: Sequence[Any], state: StepState, batch: tuple[Tensor, Tensor, Tensor]) -> None:
        if not others:
            return
        members: list[tuple[int, nn.Module | None, nn.Module | None]] = [(self.member.id, None, None)]
        for rec in others:
            rec.check()
            if rec.step != state.step:
                raise RuntimeError(f"member {self.member.id} at step {state.step} got member {rec.member}'s weights "
                                   f"of step {rec.step}: the exchange is out of order")
            model, loss = self._replica(rec.member)
            rec.load_into(model, loss)
            members.append((rec.member, model, loss))
        state.adversary = EnsembleAdversary(sorted(members, key=lambda t: t[0]))

    @classmethod
    def bytes_per_step(cls, geometry: Geometry) -> dict[str, int]:
        published = geometry.weight_bytes + 64
        return {"published": published, "received": (geometry.members - 1) * published}
