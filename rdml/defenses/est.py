"""EST, Embedding-Shifted Triplet (Zhou et al., ECCV 2020).

Every image of the batch (all 2B) is independently pushed as far from its own benign embedding as the
budget allows (the ES attack: PGD minimising -||φ(x̃) - φ(x)||, with the evaluation suite's constant
offset :data:`rdml.attacks.ranking.ES_OFFSET`, robrank's effective one, so the gradient at x̃ = x is
defined and the attack is deterministic). The configured metric loss is then applied to the adversarial embeddings, so triplets are
re-sampled on them by the loss's own sampler.

BatchNorm: robrank trains EST with BN in *train* mode (its ``is_advtrain`` skips the BN freeze),
while HM/ACT/vanilla freeze BN. rdml does not do this silently: the loss forward uses whatever mode
the model is in, and BN freezing is the model's setting (``model.freeze_bn``). The EST recipes set
``model.freeze_bn: false`` to reproduce robrank; set it to true for a like-for-like comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rdml.attacks.pgd import Budget, PGDResult, frozen_eval
from rdml.attacks.ranking import shift_distance
from rdml.defenses.base import (
    Adversary,
    Craft,
    Defense,
    DefenseOutput,
    StepState,
    benign_embeddings,
    plain,
    run_adversary,
)


def es_objective(model: nn.Module, reference: Tensor):
    """-||φ(x) - reference|| per sample (the ES attack's objective, same offset)."""

    def objective(x: Tensor) -> Tensor:
        return -shift_distance(model(x), reference)

    return objective


def es_perturb(
    model: nn.Module, images: Tensor, budget: Budget, generator: torch.Generator | None = None,
    adversary: Adversary | None = None,
) -> tuple[PGDResult, Tensor]:
    """Embedding-shift attack on every image; returns the PGD result and the achieved shift [n].

    ``adversary``: a self-transfer hook (:func:`rdml.defenses.base.run_adversary`); None runs the engine.
    """
    model = plain(model)
    reference = benign_embeddings(model, images)
    craft = Craft(es_objective(model, reference), images, budget, torch.arange(images.shape[0], device=images.device),
                  lambda other, _loss: es_objective(other, benign_embeddings(other, images)), generator=generator)
    with frozen_eval(model):
        res = run_adversary(StepState(adversary=adversary), craft)
        with torch.no_grad():
            shift = (model(res.x_adv) - reference).norm(dim=1)
    return res, shift


class EmbeddingShiftedTriplet(Defense):
    """``defense.name=est``: the metric loss on ES-perturbed images (every image of the batch).

    ``EmbeddingShiftedTriplet(eps=8/255, alpha=2/255, steps=8, loss=TripletLoss(sampler="random"))``:
    the budget keywords of :class:`rdml.defenses.base.Defense` and the metric loss applied to the
    adversarial embeddings (any :class:`rdml.losses.MetricLoss`).
    """

    name = "est"

    def step(self, model: nn.Module, images: Tensor, labels: Tensor, state: StepState) -> DefenseOutput:
        loss_fn = self._needs_loss()
        res, shift = es_perturb(model, images, self.budget, state.generator, state.adversary)
        loss = loss_fn(model(res.x_adv), labels)
        value = float(loss.detach())
        stats = {
            "loss": value,
            "loss_adv": value,
            "pgd_iters": float(res.iterations.float().mean()),
            "perturbed_frac": float((res.iterations > 0).float().mean()),
            "embedding_shift": float(shift.mean()),
        }
        return DefenseOutput(loss, stats, passes=res.passes + 1)
