"""The plain min-max adversary (``defense.name=minmax``) and the fixed crafting objective of the metric losses.

The triplet loss re-mines at every call; an adversary that maximised it would chase different
triplets at every PGD iteration. ``MetricLoss.fixed`` mines once on the clean embeddings and keeps the
triplets: these tests check that the whole PGD run of one minmax step targets one fixed set of triplets.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rdml.attacks.pgd import Budget, frozen_eval, pgd
from rdml.config import DefenseConfig, LossConfig, PGDConfig
from rdml.defenses import MinMax, StepState, build_defense
from rdml.defenses.base import benign_embeddings
from rdml.losses import ProxyAnchorLoss, TripletLoss, build_loss, mine_triplets, triplet_loss
from rdml.losses.triplet import FixedTriplets

EPS, ALPHA, STEPS = 0.3, 0.1, 5


class Tiny(nn.Module):
    def __init__(self, seed: int = 0, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, dim))
        self.embedding_dim = dim

    def forward(self, x):
        return F.normalize(self.net(x), dim=1)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(16, 1, 8, 8, generator=g), torch.arange(8).repeat_interleave(2) % 4


def test_fixed_triplets_are_mined_once_and_kept():
    loss = TripletLoss(sampler="random", margin=0.2)
    g = torch.Generator().manual_seed(0)
    clean, other = torch.randn(16, 8), torch.randn(16, 8)
    _, labels = batch()
    fixed = loss.fixed(clean, labels, torch.Generator().manual_seed(3))
    a, p, n = mine_triplets(F.normalize(clean, dim=-1), labels, "random", 0.2, torch.Generator().manual_seed(3), "auto")
    assert isinstance(fixed, FixedTriplets) and all(torch.equal(u, v) for u, v in zip(fixed.triplets, (a, p, n), strict=True))
    for emb in (clean, other, torch.randn(16, 8, generator=g)):  # whatever the embeddings: the same triplets
        assert torch.equal(fixed(emb), triplet_loss(F.normalize(emb, dim=-1), a, p, n, 0.2))
    torch.manual_seed(0)
    twice = [float(loss(other, labels)) for _ in range(4)]  # forward re-mines at every call (random sampler)
    assert len(set(twice)) > 1
    assert len({float(fixed(other)) for _ in range(4)}) == 1


def test_minmax_step_targets_the_same_triplets_at_every_pgd_iteration():
    """The step's adversarial batch is exactly PGD on the loss of the triplets mined once on the clean batch."""
    images, labels = batch()
    loss = TripletLoss(sampler="random", margin=0.2)
    defense = MinMax(eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True, loss=loss)
    model = Tiny()
    model.train()
    inputs = []
    original = model.forward

    def recording(x):  # every PGD iterate the adversary evaluates
        if not model.training and x.requires_grad:
            inputs.append(x.detach().clone())
        return original(x)

    model.forward = recording
    out = defense.step(model, images, labels, StepState(generator=torch.Generator().manual_seed(5)))
    assert len(inputs) == STEPS  # one gradient evaluation per iteration
    # the reference: the same generator draws, triplets mined once, held for all iterations
    gen = torch.Generator().manual_seed(5)
    reference = Tiny()
    clean = benign_embeddings(reference, images)
    a, p, n = mine_triplets(F.normalize(clean, dim=-1), labels, "random", 0.2, gen, "auto")
    with frozen_eval(reference):
        ref = pgd(lambda x: (-triplet_loss(F.normalize(reference(x), dim=-1), a, p, n, 0.2) / 16).expand(16),
                  images, Budget(EPS, ALPHA, STEPS, random_start=True), generator=gen)
    with torch.no_grad():
        for x_t in inputs[1:]:  # every iterate after the first moved along the fixed triplets' gradient
            assert float((x_t - images).abs().max()) <= EPS + 1e-6
    with torch.no_grad():
        expected = float(triplet_loss(F.normalize(Tiny()(ref.x_adv), dim=-1), a, p, n, 0.2))
    assert out.stats["loss_adv"] == pytest.approx(expected, abs=1e-6)
    assert out.passes == STEPS + 1 and out.stats["pgd_iters"] == STEPS
    assert 0 < out.stats["embedding_spread"] <= 2


def test_minmax_raises_the_loss_and_supports_proxy_anchor_and_a_clean_term():
    images, labels = batch()
    for loss in (TripletLoss(sampler="semihard", margin=0.2), ProxyAnchorLoss(4, 8)):
        model = Tiny()
        with torch.no_grad():
            clean_loss = float(loss.fixed(model(images), labels, torch.Generator().manual_seed(0))(model(images)))
        out = MinMax(eps=EPS, alpha=ALPHA, steps=STEPS, loss=loss).step(
            model, images, labels, StepState(generator=torch.Generator().manual_seed(0)))
        assert out.stats["loss_adv"] > clean_loss  # the adversary maximised the (fixed) loss
        out.loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        if isinstance(loss, ProxyAnchorLoss):
            assert loss.proxies.grad is not None  # the proxies learn from the adversarial batch
    mixed = MinMax(eps=EPS, alpha=ALPHA, steps=STEPS, clean_weight=0.5, loss=TripletLoss()).step(
        Tiny(), images, labels, StepState(generator=torch.Generator().manual_seed(0)))
    assert mixed.loss.item() == pytest.approx(0.5 * mixed.stats["loss_adv"] + 0.5 * mixed.stats["loss_clean"])
    assert mixed.passes == STEPS + 1


def test_minmax_from_the_config():
    loss_cfg = LossConfig(name="proxy_anchor")
    d = build_defense(DefenseConfig(name="minmax", minmax_clean_weight=0.25,
                                    pgd=PGDConfig(eps=EPS, alpha="auto", steps=4, random_start=True)),
                      loss_cfg, build_loss(loss_cfg, 4, 8))
    assert isinstance(d, MinMax) and d.clean_weight == 0.25 and d.budget.random_start
    assert d.budget.steps * d.budget.alpha >= d.budget.eps
