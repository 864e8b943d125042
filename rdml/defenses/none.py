"""Regular (non-adversarial) training: the configured metric loss on the benign batch."""

from __future__ import annotations

from torch import Tensor, nn

from rdml.defenses.base import Defense, DefenseOutput, StepState


class NoDefense(Defense):
    """``defense.name=none``: one forward/backward pass, the loss mines with its own sampler.

    ``NoDefense(loss=TripletLoss(sampler="random", margin=0.2))``; no budget is used.
    """

    name = "none"
    adversarial = False

    def __init__(self, *, loss: nn.Module | None = None, **budget) -> None:
        super().__init__(loss=loss, **budget)

    def step(self, model: nn.Module, images: Tensor, labels: Tensor, state: StepState) -> DefenseOutput:
        loss = self._needs_loss()(model(images), labels)
        value = float(loss.detach())
        stats = {"loss": value, "loss_adv": value, "pgd_iters": 0.0, "perturbed_frac": 0.0}
        return DefenseOutput(loss, stats, passes=1)
