"""Intra-Class Structure term (HM paper §3.3), composable with HM (``defense.ics=true``).

    L_ICS = mean_i max(0, d(a_i, ã_i) - d(a_i, p_i))

i.e. the triplet loss L_T(a, ã, p; margin 0) with the *benign* anchor a as anchor, the adversarial
anchor ã as "positive" and the benign positive p as "negative". It asks the adversarial anchor to stay
closer to its benign self than the benign positive is, which keeps the intra-class structure that
adversarial training alone destroys. a and p are benign embeddings computed with gradient in train
mode; ã comes from the same forward as HM's adversarial loss. Margin 0 is deliberate (0.2 lowers R@1).
The weight lambda (``defense.ics_weight``) is applied by the caller: 0.5 by default, 0.05 on SOP.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def ics_term(anchor: Tensor, anchor_adv: Tensor, positive: Tensor) -> Tensor:
    """Unweighted L_ICS for aligned rows of benign anchors, adversarial anchors and benign positives.

    Written out rather than via ``rdml.losses.triplet_loss`` because torch's ``triplet_margin_loss``
    rejects margin 0; same distance (``F.pairwise_distance``, eps 1e-6) and mean reduction.
    """
    return F.relu(F.pairwise_distance(anchor, anchor_adv) - F.pairwise_distance(anchor, positive)).mean()
