"""EST, Embedding-Shifted Triplet (Zhou et al., ECCV 2020).

Every image of the batch (all 2B) is independently pushed as far from its own benign embedding as the
budget allows (the ES attack: PGD minimising -||φ(x̃) - φ(x)||, with a tiny random offset of 1e-7 on
the reference at iteration 0 so the gradient at x̃ = x is not the zero/undefined gradient of a norm at
0). The configured metric loss is then applied to the adversarial embeddings, so triplets are
re-sampled on them by the loss's own sampler.

BatchNorm: robrank trains EST with BN in *train* mode (its ``is_advtrain`` skips the BN freeze),
while HM/ACT/vanilla freeze BN. rdml does not do this silently: the loss forward uses whatever mode
the model is in, and BN freezing is the model's setting (``model.freeze_bn``). The EST recipes set
``model.freeze_bn: false`` to reproduce robrank; set it to true for a like-for-like comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rdml.attacks.pgd import Budget, PGDResult, frozen_eval, pgd
from rdml.attacks.ranking import ES_OFFSET
from rdml.defenses.base import Defense, DefenseOutput, StepState, benign_embeddings, plain

REFERENCE_OFFSET = ES_OFFSET  # shared with the ES attack of the evaluation suite


def es_objective(model: nn.Module, reference: Tensor, generator: torch.Generator | None = None):
    """-||φ(x) - reference|| per sample; the first call offsets the reference by ~1e-7."""
    calls = [0]
    offset = torch.randn(reference.shape, generator=generator, device="cpu").to(reference) * REFERENCE_OFFSET

    def objective(x: Tensor) -> Tensor:
        ref = reference + offset if calls[0] == 0 else reference
        calls[0] += 1
        return -(model(x) - ref).norm(dim=1)

    return objective


def es_perturb(
    model: nn.Module, images: Tensor, budget: Budget, generator: torch.Generator | None = None
) -> tuple[PGDResult, Tensor]:
    """Embedding-shift attack on every image; returns the PGD result and the achieved shift [n]."""
    model = plain(model)
    reference = benign_embeddings(model, images)
    with frozen_eval(model):
        res = pgd(es_objective(model, reference, generator), images, budget, generator=generator)
        with torch.no_grad():
            shift = (model(res.x_adv) - reference).norm(dim=1)
    return res, shift


class EmbeddingShiftedTriplet(Defense):
    """``defense.name=est``: the metric loss on ES-perturbed images (every image of the batch)."""

    name = "est"

    def step(self, model: nn.Module, images: Tensor, labels: Tensor, state: StepState) -> DefenseOutput:
        res, shift = es_perturb(model, images, self.budget, state.generator)
        loss = self.loss(model(res.x_adv), labels)
        value = float(loss.detach())
        stats = {
            "loss": value,
            "loss_adv": value,
            "pgd_iters": float(res.iterations.float().mean()),
            "perturbed_frac": float((res.iterations > 0).float().mean()),
            "embedding_shift": float(shift.mean()),
        }
        return DefenseOutput(loss, stats, passes=res.passes + 1)
