"""The one interface every training-time defense implements.

The training loop (``rdml.train``) does not know which defense runs: each step it calls
``defense.step(model, images, labels, state)`` and back-propagates ``output.loss``. The defense owns
everything between the batch and the loss: benign mining, the inner maximisation (an objective handed
to the one PGD engine, :func:`rdml.attacks.pgd.pgd`, with the model frozen in eval mode via
:func:`rdml.attacks.pgd.frozen_eval`), and the outer loss computed in the model's current (train) mode.

``passes`` counts forward+backward passes *with gradient* in this step (PGD iterations + the update
pass, + 1 for ICS's benign pass); the no-grad benign forward used for mining is not counted, which
matches the papers' "eta + 1" cost per iteration.

Data parallel: ``model`` may be a DistributedDataParallel wrapper. The inner maximisation and the
benign mining forward run on the plain module (:func:`plain`), because DDP forwards are collectives
and PGD may stop early on one rank only; exactly *one* forward per step goes through the wrapper
(the update forward; several forwards before one backward break DDP's reducer), so defenses that
need benign and adversarial embeddings concatenate them into that single forward.

Randomness: ``StepState.generator`` seeds the samplers, the attack-rate draw and PGD's random start,
which all draw on CPU; a CUDA generator is turned into a CPU one seeded from it; None uses torch's
global RNG (the ``none`` and ``est`` defenses mine inside the metric loss, which uses the global RNG).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rdml.attacks.pgd import Budget, frozen_eval
from rdml.config import DefenseConfig, LossConfig
from rdml.errors import ConfigError
from rdml.losses import mine_triplets


@dataclass
class StepState:
    """Where training is: global step, epoch and progress in [0,1] (for schedules).

    ``generator`` (optional, a CPU generator: mining and PGD random starts draw on CPU) seeds the
    in-batch samplers and the attack-rate draw so a step is reproducible; None uses torch's global RNG.
    """

    step: int = 0
    epoch: int = 0
    progress: float = 0.0
    generator: torch.Generator | None = None


@dataclass
class DefenseOutput:
    """The loss to back-propagate (with grad), scalar statistics to log, and the step's cost."""

    loss: Tensor
    stats: dict[str, float] = field(default_factory=dict)
    passes: int = 1


class Defense:
    """Base class: holds the configs and the metric loss; subclasses implement :meth:`step`."""

    name = "base"

    def __init__(self, defense_cfg: DefenseConfig, loss_cfg: LossConfig, loss: nn.Module) -> None:
        self.cfg = defense_cfg
        self.loss_cfg = loss_cfg
        self.loss = loss
        self.budget = Budget.from_config(defense_cfg.pgd)

    def step(self, model: nn.Module, images: Tensor, labels: Tensor, state: StepState) -> DefenseOutput:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume (e.g. the gradual adversary's previous loss)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"defense {self.name!r} keeps no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget})"


def require_triplet(defense: str, loss_cfg: LossConfig) -> None:
    """Defenses that craft triplets themselves need the triplet loss (its margin is gamma)."""
    if loss_cfg.name != "triplet":
        raise ConfigError(
            f"defense.name={defense} perturbs triplets and needs loss.name=triplet, got loss.name={loss_cfg.name}; "
            "set loss.name=triplet (or use defense.name=none/est with other losses)"
        )


def plain(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (``.module``) wrapper, else the model itself."""
    return getattr(model, "module", model)


@torch.no_grad()
def benign_embeddings(model: nn.Module, images: Tensor) -> Tensor:
    """Embeddings for mining and as fixed references: eval mode, no gradient, mode restored after."""
    model = plain(model)
    with frozen_eval(model):
        return model(images).detach()


def mine(emb: Tensor, labels: Tensor, sampler: str, margin: float, state: StepState) -> tuple[Tensor, Tensor, Tensor]:
    """One triplet per anchor with ``sampler``; the batch layout (SPC-2 pairs or m-per-class) is detected
    the same way :class:`rdml.losses.TripletLoss` does."""
    return mine_triplets(emb, labels, sampler, margin, generator=state.generator, layout="auto")
