"""Losses and samplers: each sampler obeys its definition (robrank miner.py) and is seedable."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rdml.config import LossConfig
from rdml.losses import (
    SAMPLERS,
    ContrastiveLoss,
    ProxyAnchorLoss,
    TripletLoss,
    build_loss,
    hardness,
    inverse_sphere_log_density,
    mine_triplets,
    pairwise_distance_matrix,
    param_groups,
    triplet_loss,
)


def spc2_batch(pairs: int = 16, classes: int = 5, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (pairs,), generator=g).repeat_interleave(2)
    emb = F.normalize(torch.randn(2 * pairs, dim, generator=g), dim=1)
    return emb, labels


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_triplets_are_valid_and_deterministic(sampler):
    emb, labels = spc2_batch()
    a, p, n = mine_triplets(emb, labels, sampler, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, torch.arange(0, 32, 2))
    assert (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all()
    if sampler != "softhard":
        assert torch.equal(p, a + 1)  # only softhard changes the positive
    again = mine_triplets(emb, labels, sampler, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip((a, p, n), again, strict=True))


def test_hardest_is_nearest_negative_and_semihard_in_band():
    emb, labels = spc2_batch(pairs=24, dim=4)
    d = pairwise_distance_matrix(emb)
    a, p, n = mine_triplets(emb, labels, "hardest")
    for ai, ni in zip(a, n, strict=True):
        neg = labels != labels[ai]
        assert d[ai, ni] == d[ai][neg].min()
    a, p, n = mine_triplets(emb, labels, "semihard", margin=0.2, generator=torch.Generator().manual_seed(0))
    for ai, pi, ni in zip(a, p, n, strict=True):
        neg = labels != labels[ai]
        band = neg & (d[ai] > d[ai, pi]) & (d[ai] < d[ai, pi] + 0.2)
        if band.any():
            assert band[ni]


def test_softhard_definition():
    emb, labels = spc2_batch(pairs=24, classes=4, dim=4, seed=3)
    d = pairwise_distance_matrix(emb)
    a, p, n = mine_triplets(emb, labels, "softhard", generator=torch.Generator().manual_seed(0))
    for ai, pi, ni in zip(a, p, n, strict=True):
        same, neg = labels == labels[ai], labels != labels[ai]
        far_pos, near_neg = d[ai][same].max(), d[ai][neg].min()
        if (neg & (d[ai] < far_pos)).any():
            assert d[ai, ni] < far_pos
        if (same & (d[ai] > near_neg)).any():
            assert d[ai, pi] > near_neg
        assert same[pi]  # may be the anchor itself (robrank's fallback)


def test_distance_weighted_follows_inverse_density():
    """Empirical negative frequencies match 1/q(d) on a batch with one anchor class."""
    torch.manual_seed(0)
    dim = 8
    emb = F.normalize(torch.randn(2 + 10, dim), dim=1)
    labels = torch.tensor([0, 0] + [1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    d = pairwise_distance_matrix(emb)[0]
    w = torch.exp(inverse_sphere_log_density(d, dim)).double()
    w[:2] = 0
    expected = w / w.sum()
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(12, dtype=torch.float64)
    for _ in range(1500):
        _, _, n = mine_triplets(emb, labels, "distance", generator=g)
        counts[n[0]] += 1
    assert counts[:2].sum() == 0
    assert (counts / counts.sum() - expected).abs().max() < 0.04


def test_inverse_density_is_finite_and_cuts_off_only_when_asked():
    d = torch.tensor([0.0, 0.1, 0.5, 1.0, 1.99, 2.0])
    v = inverse_sphere_log_density(d, 512)  # robrank's sampler: no cutoff
    assert torch.isfinite(v).all()
    assert v[0] > v[1] > v[2]  # closer negatives weigh more without a cutoff
    assert v[3] < v[2]  # 1/q is smallest near sqrt(2), the typical distance in high dimension
    cut = inverse_sphere_log_density(d, 512, cutoff=0.5)  # Wu et al. / pytorch-metric-learning
    assert cut[0] == cut[1] == cut[2]


def test_m_per_class_layout():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    emb = F.normalize(torch.randn(10, 6), dim=1)
    a, p, n = mine_triplets(emb, labels, "random", layout="m_per_class", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, torch.arange(10))
    assert (labels[p] == labels[a]).all() and (labels[n] != labels[a]).all()
    assert (p[:9] != a[:9]).all() and p[9] == 9  # a lone class uses itself as positive
    with pytest.raises(ValueError, match="SPC-2"):
        mine_triplets(emb, labels, "random", layout="pairs")


def test_hardest_dominates_other_samplers():
    """With the same positive (2i+1), the hardest negative gives the largest hardness per triplet."""
    emb, labels = spc2_batch(pairs=32, classes=8, dim=16, seed=4)
    g = torch.Generator().manual_seed(0)
    h_hard = hardness(emb, *mine_triplets(emb, labels, "hardest"))
    for s in ("random", "semihard", "distance"):
        h = hardness(emb, *mine_triplets(emb, labels, s, generator=g))
        assert (h_hard >= h - 1e-6).all()
    assert h_hard.mean() > hardness(emb, *mine_triplets(emb, labels, "random", generator=g)).mean()


def test_triplet_loss_and_hardness_by_hand():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    a, p, n = torch.tensor([0]), torch.tensor([1]), torch.tensor([2])
    h = hardness(emb, a, p, n)
    assert h.item() == pytest.approx(math.sqrt(2), abs=1e-5)
    assert triplet_loss(emb, a, p, n, 0.2).item() == pytest.approx(math.sqrt(2) + 0.2, abs=1e-5)
    assert triplet_loss(emb, a, n, p, 0.2).item() == 0.0  # H = -sqrt(2) < -margin


def test_triplet_loss_module_trains():
    torch.manual_seed(0)
    emb, labels = spc2_batch(pairs=16, classes=4, dim=8)
    emb.requires_grad_(True)
    loss = TripletLoss("semihard", 0.2)(emb, labels)
    loss.backward()
    assert loss.item() > 0 and emb.grad is not None and emb.grad.abs().sum() > 0


def test_contrastive_matches_hand_computation():
    emb = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    d = pairwise_distance_matrix(emb)
    pos = [d[0, 1], d[2, 3]]  # pos_margin 0 -> d
    neg = [torch.relu(1.0 - d[i, j]) for i in (0, 1) for j in (2, 3)]
    pos_t, neg_t = torch.stack(pos), torch.stack(neg)
    expected = pos_t[pos_t > 0].mean() + neg_t[neg_t > 0].mean()  # each term averaged over its non-zero pairs
    assert ContrastiveLoss(0.0, 1.0)(emb, labels).item() == pytest.approx(expected.item(), abs=1e-5)


def test_proxy_anchor_hand_computation_and_lr_groups():
    """3-class 2-D toy: matches the formula (pos term / #proxies with positives, neg term / #classes)."""
    loss = ProxyAnchorLoss(num_classes=3, embedding_dim=2, margin=0.1, alpha=32)
    with torch.no_grad():
        loss.proxies.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    emb = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.9, -0.2]]), dim=1)
    labels = torch.tensor([0, 1, 0])
    cos = emb @ F.normalize(loss.proxies.detach(), dim=1).T
    pos_terms, neg_terms = [], []
    for c in range(3):
        is_pos = labels == c
        if is_pos.any():
            pos_terms.append(torch.log1p(torch.exp(-32 * (cos[is_pos, c] - 0.1)).sum()))
        neg_terms.append(torch.log1p(torch.exp(32 * (cos[~is_pos, c] + 0.1)).sum()))
    expected = sum(pos_terms) / len(pos_terms) + sum(neg_terms) / 3
    assert loss(emb, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    # aligned embeddings have a lower loss than misaligned ones
    aligned = loss(F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1), torch.tensor([0, 1]))
    swapped = loss(F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1), torch.tensor([1, 0]))
    assert aligned < swapped
    model = torch.nn.Linear(2, 2)
    groups = param_groups(model, loss, lr=1e-3, proxy_lr_multiplier=100.0)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(0.1)]
    assert groups[1]["params"][0] is loss.proxies


def test_build_loss():
    t = build_loss(LossConfig(name="triplet", sampler="softhard", margin=0.3), 10, 8)
    assert isinstance(t, TripletLoss) and t.sampler == "softhard" and t.margin == 0.3
    assert isinstance(build_loss(LossConfig(name="contrastive"), 10, 8), ContrastiveLoss)
    pa = build_loss(LossConfig(name="proxy_anchor"), 10, 8)
    assert isinstance(pa, ProxyAnchorLoss) and pa.proxies.shape == (10, 8)
    assert param_groups(torch.nn.Linear(2, 2), t, 1e-3, 100.0)[0]["lr"] == 1e-3
    assert len(param_groups(torch.nn.Linear(2, 2), t, 1e-3, 100.0)) == 1
