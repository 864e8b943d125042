"""A query-only black-box attack on retrieval: random search in the style of Square (Andriushchenko et al.).

Why: a defense can *mask* gradients (a quantised or non-differentiable input layer, shattered or
vanishing gradients) so that every gradient attack fails although the model is not robust. A search
that uses only the model's outputs does not need gradients; when it breaks more queries than the
white-box attacks, the white-box numbers are not to be trusted (AutoAttack's sanity check, Croce & Hein
2020; docs/methods.md#worst-case-suite).

The search (Square attack, ECCV 2020, arXiv:1912.00049, L-inf version), per attacked item:

1. start at the clean image plus vertical stripes of +-eps (one random sign per channel and column);
2. each iteration draws a square of side s (a fraction p of the image's pixels, p halved on Square's
   schedule of the query budget, from ``p_init``) at a random place and sets it, in every channel, to
   the clean value +- eps (a random sign per channel), clipped to [0, 1];
3. keeps the new image only if it lowers the *top-1 margin* m = d(q~, nearest negative) - d(q~,
   nearest positive) (self excluded): the retrieval analogue of Square's margin loss. m < 0 means the
   query's top-1 is wrong (R@1 = 0; a tie counts for the positive, as in every rdml R@1);
4. stops for an item once its R@1 is broken, or when its query budget (model forwards) is spent.

Everything is drawn from one seeded CPU generator per attack (``attack_generator(seed, "blackbox")``),
whole-batch draws every iteration, so a run is reproducible. Only forwards without gradient are made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rdml.attacks.ranking import Batch, Database


def top1_margin(emb: Tensor, db: Database, batch: Batch) -> Tensor:
    """d(nearest negative) - d(nearest positive) per item, self excluded (>= 0: R@1 holds; NaN: no positive)."""
    d = db.dist_masked(emb, batch.self_index)
    same = db.labels.unsqueeze(0) == batch.labels.unsqueeze(1)
    near_pos = d.masked_fill(~same, math.inf).min(dim=1).values
    near_neg = d.masked_fill(same, math.inf).min(dim=1).values
    margin = near_neg - near_pos
    return torch.where(torch.isfinite(near_pos), margin, torch.full_like(margin, math.nan))


def square_fraction(it: int, queries: int, p_init: float) -> float:
    """Square's schedule of the square's share of the pixels, on a budget of ``queries`` (rescaled to 10,000)."""
    t = int(it / max(queries, 1) * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if t <= bound:
            return p_init / div
    return p_init / 512


@dataclass
class SearchResult:
    """The black-box search's adversarial inputs, their embeddings, and the queries it spent per item."""

    x_adv: Tensor
    emb: Tensor
    queries: Tensor  # model forwards per item (int64)
    margin: Tensor


@torch.no_grad()
def square_search(model: nn.Module, x0: Tensor, db: Database, batch: Batch, eps: float, queries: int,
                  p_init: float, generator: torch.Generator) -> SearchResult:
    """Square-style L-inf random search on the top-1 margin of every item of a batch (see the module docstring)."""
    n, c, h, w = x0.shape
    if eps == 0 or queries == 0:
        emb = model(x0)
        return SearchResult(x0.clone(), emb, torch.zeros(n, dtype=torch.long), top1_margin(emb, db, batch))
    dev = x0.device
    stripes = torch.randint(0, 2, (n, c, 1, w), generator=generator).to(dev, x0.dtype) * 2 - 1
    x = (x0 + eps * stripes).clamp(0.0, 1.0)
    emb = model(x)
    margin = top1_margin(emb, db, batch)
    used = torch.ones(n, dtype=torch.long)
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    for it in range(1, queries):
        p = square_fraction(it, queries, p_init)
        side = max(1, min(int(round(math.sqrt(p * h * w))), h - 1, w - 1))
        top = torch.randint(0, h - side + 1, (n,), generator=generator).to(dev).view(n, 1, 1)
        left = torch.randint(0, w - side + 1, (n,), generator=generator).to(dev).view(n, 1, 1)
        signs = (torch.randint(0, 2, (n, c, 1, 1), generator=generator).to(dev, x0.dtype) * 2 - 1)
        active = (margin >= 0).nonzero().view(-1)  # still retrieved correctly (NaN: no positive, skipped)
        if len(active) == 0:
            break
        square = ((rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)).unsqueeze(1)[active]
        cand = torch.where(square, (x0[active] + eps * signs[active]).clamp(0.0, 1.0), x[active])
        cand_emb = model(cand)
        sub = Batch(self_index=batch.self_index[active], labels=batch.labels[active], clean=batch.clean[active],
                    clean_db=batch.clean_db[active])
        cand_margin = top1_margin(cand_emb, db, sub)
        used[active.cpu()] += 1
        better = cand_margin < margin[active]
        take = active[better]
        if len(take):
            x[take] = cand[better]
            emb[take] = cand_emb[better]
            margin[take] = cand_margin[better]
    return SearchResult(x, emb, used, margin)
