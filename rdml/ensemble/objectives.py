"""Per-sample robustness statistics a member publishes with the examples its adversary crafted.

Loss-agnostic, so they mean the same with triplet, proxy-anchor or contrastive members: the
batch-hard triplet hinge on the adversarial embeddings (the ensemble's "adversarial loss" of a
sample), the hardness d(a,p) - d(a,n) with the hardest positive and negative, and the embedding shift
||f(x_adv) - f(x)||. The crafting objectives themselves belong to the defenses
(:class:`rdml.defenses.base.Craft`); self-transfer only changes which objective the adversary
optimises (:mod:`rdml.ensemble.transfer`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rdml.losses import hardness as triplet_hardness


def _batch_hard(emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every sample as anchor, its farthest positive and nearest negative (itself if none)."""
    d = torch.cdist(emb, emb)
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    pos_d = d.masked_fill(~same | eye, -1.0)
    neg_d = d.masked_fill(same, float("inf"))
    a = torch.arange(len(labels), device=emb.device)
    p = torch.where(pos_d.max(1).values >= 0, pos_d.argmax(1), a)
    n = torch.where(torch.isfinite(neg_d.min(1).values), neg_d.argmin(1), a)
    return a, p, n


@torch.no_grad()
def per_sample_stats(emb_adv: Tensor, emb_clean: Tensor, labels: Tensor, margin: float) -> dict[str, Tensor]:
    """Per-sample adversarial loss (batch-hard hinge), hardness d(a,p)-d(a,n), embedding shift."""
    a, p, n = _batch_hard(emb_adv, labels)
    hard = triplet_hardness(emb_adv, a, p, n)
    return {
        "adv_loss": torch.relu(hard + margin),
        "hardness": hard,
        "shift": (emb_adv - emb_clean).norm(dim=1),
    }
