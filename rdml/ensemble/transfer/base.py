"""What a self-transfer mode is: a strategy object per member, written once against the exchange.

A strategy (:class:`SelfTransfer`) belongs to one member (:class:`rdml.ensemble.member.Member`) and
has four jobs, which both backends call in the same order:

* :meth:`~SelfTransfer.publish`: the record this member shares before its next step (None: nothing);
* :meth:`~SelfTransfer.hooks`: given the other members' records, set the step's hooks on the
  :class:`~rdml.defenses.base.StepState`: ``adversary`` (what the defense's inner maximisation
  optimises, or a watcher of it) and ``extra`` (examples the step also trains on);
* :meth:`~SelfTransfer.finish`: after the update (keep what the next :meth:`publish` needs);
* :meth:`~SelfTransfer.state_dict` / :meth:`~SelfTransfer.load_state_dict`: what a checkpoint must hold
  so that a restore replays exactly.

Plus, per class, :meth:`~SelfTransfer.requirements` (what the config must satisfy: checked with every
other ensemble setting before anything starts, :func:`rdml.ensemble.validate.check_ensemble`) and
:meth:`~SelfTransfer.bytes_per_step` (what a member publishes and receives per step).

A new mode is one file with a subclass decorated by :func:`register`, imported by
:mod:`rdml.ensemble.transfer` (or by the code that uses it: the registry is what the config's
``ensemble.self_transfer`` accepts). The backends never change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from rdml.config import ExperimentConfig
from rdml.defenses.base import StepState
from rdml.errors import ConfigError

SELF_TRANSFER: dict[str, type[SelfTransfer]] = {}
"""Every registered mode by name (``ensemble.self_transfer``'s allowed values)."""


@dataclass(frozen=True)
class Geometry:
    """What the exchange volume depends on: batch, image geometry, members, PGD iterations, member weight bytes."""

    batch: int
    channels: int
    image_size: int
    members: int
    pgd_steps: int
    weight_bytes: int


class SelfTransfer:
    """Base strategy: shares nothing, changes nothing (see the module doc for the four jobs)."""

    name: ClassVar[str] = ""
    #: one line for ``rdml config`` / docs: what the mode does
    summary: ClassVar[str] = ""

    def __init__(self, member: Any) -> None:
        self.member = member

    @classmethod
    def requirements(cls, cfg: ExperimentConfig) -> list[str]:
        """Problems with ``cfg`` for this mode, each naming its fix (empty: fine). Default: the mode
        transfers between members through the defense's adversary, so it needs two members and a defense
        that has an adversary."""
        from rdml.defenses import DEFENSES

        problems = []
        if cfg.ensemble.members < 2:
            problems.append(f"ensemble.self_transfer={cls.name} transfers between members but ensemble.members=1: "
                            "set ensemble.members >= 2, or self_transfer=none")
        defense = DEFENSES.get(cfg.defense.name)
        if defense is not None and not defense.adversarial:
            problems.append(f"ensemble.self_transfer={cls.name} acts on the defense's adversary, but "
                            f"defense.name={cfg.defense.name} has none: set defense.name=minmax (EAT's adversary) "
                            "or another adversarial defense, or self_transfer=none")
        return problems

    def publish(self) -> Any | None:
        return None

    def hooks(self, others: Sequence[Any], state: StepState, batch: tuple[Tensor, Tensor, Tensor]) -> None:
        """Set ``state.adversary`` / ``state.extra`` for this step (``others``: the other members' records)."""

    def finish(self) -> None:
        """Called after the member's update of this step."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"self_transfer={self.name} keeps no state, got keys {sorted(state)}")

    @classmethod
    def bytes_per_step(cls, geometry: Geometry) -> dict[str, int]:
        """Bytes one member publishes and receives per ensemble step (computed, nothing is run)."""
        return {"published": 0, "received": 0}


def register(cls: type[SelfTransfer]) -> type[SelfTransfer]:
    """Class decorator: make ``cls.name`` a self-transfer mode (the config accepts it from now on)."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a class attribute `name` to be registered")
    SELF_TRANSFER[cls.name] = cls
    return cls


def get_transfer(name: str) -> type[SelfTransfer]:
    """The strategy class of mode ``name`` (ConfigError naming the choices if there is none)."""
    try:
        return SELF_TRANSFER[name]
    except KeyError:
        raise ConfigError(f"ensemble.self_transfer={name!r} is not a self-transfer mode; choose one of "
                          f"{', '.join(SELF_TRANSFER)}") from None
