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

Self-transfer hooks (EAT ensembles, :mod:`rdml.ensemble.transfer`): every defense hands its inner
maximisation to :func:`run_adversary` as a :class:`Craft` (its own objective, the clean rows it
perturbs and which batch image each row is, and how to build the same objective for *another*
model). Without a hook (``StepState.adversary`` is None, as in ``rdml train``) that is exactly the
call ``pgd(objective, x0, budget, ...)``, so single-model numbers do not depend on the hooks
(``tests/test_defense_regression.py``). A self-transfer strategy may replace the call (craft against
the members' mean objective) or watch it (publish what was crafted), and may add training examples
(``StepState.extra``, used by :meth:`Defense.train_step`): what the adversary optimises and which
examples the member trains on change, the training step stays the defense's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from rdml.attacks.pgd import Budget, DoneFn, Objective, PGDResult, frozen_eval, pgd
from rdml.config import DefenseConfig, LossConfig, PGDConfig
from rdml.errors import ConfigError
from rdml.losses import SAMPLERS, mine_triplets


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
    #: self-transfer hook that runs the defense's inner maximisation (None: the plain PGD engine)
    adversary: Adversary | None = None
    #: self-transfer: extra training examples for :meth:`Defense.train_step` (None: none)
    extra: ExtraExamples | None = None


ObjectiveFor = Callable[[nn.Module, "nn.Module | None"], Objective]
"""(model, its metric loss) -> the defense's objective for that model: the same inner maximisation, with the
model-dependent references (benign embeddings, mined triplets) computed with that model."""


@dataclass
class Craft:
    """One inner maximisation of a defense, described so that a self-transfer hook can change or watch it.

    ``objective`` is the defense's own per-sample objective on ``x0`` (what ``pgd`` minimises), ``index``
    the position in the step's batch of the image each row of ``x0`` perturbs (HM: ``cat(a, p, n)``),
    ``objective_for`` builds the same objective for another model (an ensemble member), and ``done``,
    ``flat_tol`` and ``generator`` are the engine's options the defense uses.
    """

    objective: Objective
    x0: Tensor
    budget: Budget
    index: Tensor
    objective_for: ObjectiveFor
    done: DoneFn | None = None
    flat_tol: float | None = None
    generator: torch.Generator | None = None


class Adversary(Protocol):
    """A self-transfer hook: runs a :class:`Craft` (the model is already frozen in eval mode)."""

    def __call__(self, craft: Craft) -> PGDResult: ...


@dataclass
class ExtraExamples:
    """Training examples a self-transfer strategy adds to a step, and the weight of their loss."""

    images: Tensor
    labels: Tensor
    weight: float = 0.5


def run_adversary(state: StepState | None, craft: Craft) -> PGDResult:
    """The defense's inner maximisation: ``state.adversary(craft)`` when a hook is set, else the PGD engine."""
    if state is not None and state.adversary is not None:
        return state.adversary(craft)
    return pgd(craft.objective, craft.x0, craft.budget, done=craft.done, flat_tol=craft.flat_tol,
               generator=craft.generator)


@dataclass
class DefenseOutput:
    """The loss to back-propagate (with grad), scalar statistics to log, and the step's cost."""

    loss: Tensor
    stats: dict[str, float] = field(default_factory=dict)
    passes: int = 1


class Defense:
    """Base class: holds the PGD budget (and, for the defenses that use it, the metric loss).

    Every defense is built with keyword arguments: the budget ``eps``, ``alpha`` (a number, or
    ``"auto"`` = 2.5 eps / steps), ``steps``, ``norm``, ``random_start`` (pixel units of [0,1] images,
    validated like the config's ``defense.pgd``: a budget that cannot reach its eps is refused unless
    ``partial_reach=True``), plus its own options. :meth:`from_config` builds the same object from the
    config sections (what the CLI and :func:`rdml.defenses.build_defense` do). Subclasses implement
    :meth:`step`.
    """

    name = "base"

    def __init__(self, *, eps: float = 77 / 255, alpha: float | str = 3 / 255, steps: int = 32, norm: str = "linf",
                 random_start: bool = False, partial_reach: bool = False, loss: nn.Module | None = None) -> None:
        self.budget = pgd_budget(eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start,
                                 partial_reach=partial_reach, who=type(self).__name__)
        self.loss = loss

    @classmethod
    def from_config(cls, defense_cfg: DefenseConfig, loss_cfg: LossConfig, loss: nn.Module) -> Defense:
        """The defense of the config sections, through the keyword constructor (the one way to build it)."""
        return cls(**budget_kwargs(defense_cfg), **cls.config_kwargs(defense_cfg, loss_cfg), loss=loss)

    @classmethod
    def config_kwargs(cls, defense_cfg: DefenseConfig, loss_cfg: LossConfig) -> dict[str, Any]:
        """The defense's own keyword arguments read from the config (the budget and loss are added by the caller)."""
        return {}

    def step(self, model: nn.Module, images: Tensor, labels: Tensor, state: StepState) -> DefenseOutput:
        raise NotImplementedError

    #: True when the defense runs an inner maximisation (self-transfer needs one to act on)
    adversarial: bool = True

    def train_step(self, model: nn.Module, images: Tensor, labels: Tensor, state: StepState) -> DefenseOutput:
        """:meth:`step`, plus the loss on ``state.extra`` (self-transfer's extra examples) when there are any.

        ``L = (1 - w) * L_step + w * L(f(x_extra), y_extra)`` with the defense's metric loss, in the
        model's current (train) mode; one more pass. Without extra examples this *is* :meth:`step`.
        """
        out = self.step(model, images, labels, state)
        extra = state.extra
        if extra is None or extra.images.shape[0] == 0:
            return out
        extra_loss = self._needs_loss()(model(extra.images), extra.labels)
        loss = (1.0 - extra.weight) * out.loss + extra.weight * extra_loss
        stats = {**out.stats, "loss": float(loss.detach()), "loss_transfer": float(extra_loss.detach())}
        return DefenseOutput(loss, stats, out.passes + 1)

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume (e.g. the gradual adversary's previous loss)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"defense {self.name!r} keeps no state, got keys {sorted(state)}")

    def _needs_loss(self) -> nn.Module:
        if self.loss is None:
            raise ConfigError(f"{type(self).__name__} applies a metric loss to the (perturbed) batch: pass one, "
                              "e.g. loss=rdml.losses.TripletLoss(sampler='random', margin=0.2)")
        return self.loss

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget})"


def pgd_budget(*, eps: float, alpha: float | str, steps: int, norm: str = "linf", random_start: bool = False,
               partial_reach: bool = False, who: str = "defense") -> Budget:
    """A training-time PGD budget validated exactly like the config's ``defense.pgd`` (:class:`PGDConfig`)."""
    try:
        cfg = PGDConfig(eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start,
                        partial_reach=partial_reach)
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'budget'}: {e['msg'].removeprefix('Value error, ')}"
                         for e in err.errors())
        raise ConfigError(f"{who}: invalid PGD budget: {msgs}") from None
    return Budget.from_config(cfg)


def budget_kwargs(defense_cfg: DefenseConfig) -> dict[str, Any]:
    """The keyword arguments of the config's ``defense.pgd`` budget."""
    pgd = defense_cfg.pgd
    return {"eps": pgd.eps, "alpha": pgd.alpha, "steps": pgd.steps, "norm": pgd.norm,
            "random_start": pgd.random_start, "partial_reach": pgd.partial_reach}


def check_sampler(who: str, what: str, sampler: str | None, allow_none: bool = False) -> None:
    """A sampler name from the registry (:data:`rdml.losses.SAMPLERS`), or a ConfigError naming the choices."""
    if sampler is None and allow_none:
        return
    if sampler not in SAMPLERS:
        raise ConfigError(f"{who}: {what}={sampler!r} is not a sampler; choose one of {', '.join(SAMPLERS)}")


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
