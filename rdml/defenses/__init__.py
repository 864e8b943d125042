"""Training-time defenses behind one interface (see :mod:`rdml.defenses.base`).

Every defense is built with keyword arguments (its PGD budget and its own options), e.g.
``HardnessManipulation(eps=77/255, alpha=3/255, steps=32, source="softhard", schedule="lga",
ics_weight=0.5, margin=0.2)``; ``build_defense(defense_cfg, loss_cfg, loss)`` builds the configured one
through the same constructor (:meth:`Defense.from_config`). The training loop calls
``defense.step(model, images, labels, StepState(...))`` and never needs to know which one.

| name  | what it does                                                          | cost (passes)      |
|-------|-----------------------------------------------------------------------|--------------------|
| none  | the metric loss on the benign batch                                   | 1                  |
| est   | ES attack on every image, loss re-mined on adversarial embeddings     | eta + 1            |
| act   | collapse P and N onto each other, benign anchor                       | eta + 1            |
| hm    | move each triplet's hardness to a destination (sampler / schedule)    | <= eta + 1 (+1 ICS)|
| panum | one role per clean tuple perturbed vs detached refs, enlarged batch   | eta + 1            |
| minmax| PGD maximising the metric loss (triplets fixed per step), then train  | eta + 1            |
| catride| CA-TRIDE: candidates or anchor perturbed in turn, to the collapse edge | <= eta + 1        |
"""

from __future__ import annotations

from torch import nn

from rdml.config import DefenseConfig, LossConfig
from rdml.defenses.act import AntiCollapseTriplet
from rdml.defenses.base import Defense, DefenseOutput, StepState
from rdml.defenses.catride import CollapseAwareTripletDecoupling
from rdml.defenses.est import EmbeddingShiftedTriplet
from rdml.defenses.hm import HardnessManipulation
from rdml.defenses.minmax import MinMax
from rdml.defenses.none import NoDefense
from rdml.defenses.panum import PanumRobust
from rdml.errors import ConfigError

DEFENSES: dict[str, type[Defense]] = {
    "none": NoDefense,
    "est": EmbeddingShiftedTriplet,
    "act": AntiCollapseTriplet,
    "hm": HardnessManipulation,
    "panum": PanumRobust,
    "minmax": MinMax,
    "catride": CollapseAwareTripletDecoupling,
}


def build_defense(defense_cfg: DefenseConfig, loss_cfg: LossConfig, loss: nn.Module) -> Defense:
    """The defense named by ``defense_cfg.name`` (ICS is part of ``hm``: ``defense.ics=true``)."""
    try:
        cls = DEFENSES[defense_cfg.name]
    except KeyError:
        raise ConfigError(f"unknown defense {defense_cfg.name!r}; choose one of {', '.join(DEFENSES)}") from None
    return cls.from_config(defense_cfg, loss_cfg, loss)


__all__ = ["DEFENSES", "AntiCollapseTriplet", "CollapseAwareTripletDecoupling", "Defense", "DefenseOutput", "EmbeddingShiftedTriplet",
           "HardnessManipulation", "MinMax", "NoDefense", "PanumRobust", "StepState", "build_defense"]
