"""Panum et al.'s robust formulation ("Exploring Adversarial Robustness of Deep Metric Learning").

A metric loss couples the samples of a batch, so perturbing the whole batch jointly lets anchor and
positive co-move, changes what the miner picks, and mismatches the test threat (clean references,
perturbed query). The robust step therefore:

1. mines tuples on the *clean* embeddings (eval mode, no grad) as Panum et al.'s code does:
   pytorch-metric-learning's ``DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)`` with every
   sample of the batch as an anchor, then one random tuple per anchor (``loss.sampler`` is not used);
2. picks one role per tuple (``defense.panum_role``: p, n or a) and, with probability rho
   (``defense.panum_rate``), replaces that member by an adversarial copy crafted against the fixed,
   detached clean embeddings of the other members:
   p: maximise ||f(x_p+δ) - sg f(x_a)||;  n: minimise ||f(x_n+δ) - sg f(x_a)||;
   a: maximise ||f(x_a+δ) - sg f(x_p)|| - ||f(x_a+δ) - sg f(x_n)||;
3. appends the copies to the batch with the same labels, redirects each attacked tuple's role index to
   its copy, and computes the triplet loss over the enlarged batch (gradient through clean and
   adversarial forwards), averaged over the triplets with a non-zero loss (pytorch-metric-learning's
   ``AvgNonZeroReducer``, the reduction of Panum's ``TripletMarginLoss``).

The paper's own budget is small (L-inf eps 0.01, 5 steps of 2 eps / 5 from a random start); the
``*-panum`` recipes keep it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rdml.attacks.pgd import Budget, PGDResult, frozen_eval
from rdml.config import DefenseConfig, LossConfig
from rdml.defenses.base import (
    Adversary,
    Craft,
    Defense,
    DefenseOutput,
    StepState,
    benign_embeddings,
    plain,
    require_triplet,
    run_adversary,
)
from rdml.errors import ConfigError
from rdml.losses import triplet_loss


@dataclass
class PanumResult:
    x_adv: Tensor  # [k, C, H, W] adversarial copies of the attacked tuples' role member
    attacked: Tensor  # [k] indices (into the tuple list) of the attacked tuples
    pgd: PGDResult | None


def panum_mine(clean: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Panum et al.'s tuples: PML's distance-weighted miner, then one random tuple per anchor.

    The miner draws with torch's global RNG; it runs under a forked RNG seeded from ``generator`` so a
    step stays reproducible and the caller's RNG stream is not consumed.
    """
    from pytorch_metric_learning.miners import DistanceWeightedMiner

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        a, p, n = DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)(clean.detach().cpu(), labels.cpu())
        order = torch.randperm(len(a))
    a, p, n = a[order], p[order], n[order]
    first = torch.ones(len(a), dtype=torch.bool)
    if len(a):
        _, inverse = torch.unique(a, return_inverse=True)
        seen = torch.zeros(int(inverse.max()) + 1, dtype=torch.bool)
        for i, g in enumerate(inverse.tolist()):  # keep the first (random) tuple of every anchor
            first[i] = not seen[g]
            seen[g] = True
    keep = first.nonzero().flatten()
    device = clean.device
    return a[keep].to(device), p[keep].to(device), n[keep].to(device)


def panum_objective(model: nn.Module, role: str, refs: tuple[Tensor, Tensor]):
    """Per-sample loss to *minimise*; ``refs`` are (anchor, _) for p/n, (positive, negative) for a."""
    first, second = (r.detach() for r in refs)

    def objective(x: Tensor) -> Tensor:
        emb = model(x)
        if role == "p":
            return -(emb - first).norm(dim=1)
        if role == "n":
            return (emb - first).norm(dim=1)
        return -((emb - first).norm(dim=1) - (emb - second).norm(dim=1))

    return objective


def panum_perturb(
    model: nn.Module,
    images: Tensor,
    clean: Tensor,
    a: Tensor,
    p: Tensor,
    n: Tensor,
    role: str,
    attacked: Tensor,
    budget: Budget,
    generator: torch.Generator | None = None,
    adversary: Adversary | None = None,
) -> PanumResult:
    """Craft adversarial copies of ``role`` for the tuples ``attacked`` against detached references.

    ``adversary``: a self-transfer hook (:func:`rdml.defenses.base.run_adversary`); None runs the engine.
    """
    if attacked.numel() == 0:
        return PanumResult(images[:0], attacked, None)
    model = plain(model)
    member = {"a": a, "p": p, "n": n}[role][attacked]

    def refs_of(emb: Tensor) -> tuple[Tensor, Tensor]:
        return (emb[p[attacked]], emb[n[attacked]]) if role == "a" else (emb[a[attacked]], emb[a[attacked]])

    craft = Craft(panum_objective(model, role, refs_of(clean)), images[member], budget, member,
                  lambda other, _loss: panum_objective(other, role, refs_of(benign_embeddings(other, images))),
                  generator=generator)
    with frozen_eval(model):
        res = run_adversary(StepState(adversary=adversary), craft)
    return PanumResult(res.x_adv, attacked, res)


class PanumRobust(Defense):
    """``defense.name=panum``: clean mining, one perturbed role per tuple at rate rho, enlarged batch.

    ``PanumRobust(eps=0.01, alpha=0.004, steps=5, random_start=True, role="p", rate=1.0, margin=0.2)``;
    from a config: ``defense.panum_role``, ``defense.panum_rate`` and ``loss.margin``.
    """

    name = "panum"
    ROLES = ("a", "p", "n")

    def __init__(self, *, role: str = "p", rate: float = 1.0, margin: float = 0.2, loss: nn.Module | None = None,
                 **budget) -> None:
        super().__init__(loss=loss, **budget)
        if role not in self.ROLES:
            raise ConfigError(f"PanumRobust: role={role!r} must be one of a, p, n (the tuple member perturbed)")
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"PanumRobust: rate={rate!r} is a probability: give a value in [0, 1]")
        self.role = role
        self.rate = float(rate)
        self.margin = float(margin)
        self.last_batch: tuple[Tensor, dict[str, Tensor]] | None = None

    @classmethod
    def config_kwargs(cls, defense_cfg: DefenseConfig, loss_cfg: LossConfig) -> dict:
        require_triplet("panum", loss_cfg)
        return {"role": defense_cfg.panum_role, "rate": defense_cfg.panum_rate, "margin": loss_cfg.margin}

    def step(self, model: nn.Module, images: Tensor, labels: Tensor, state: StepState) -> DefenseOutput:
        gamma = self.margin
        clean = benign_embeddings(model, images)
        a, p, n = panum_mine(clean, labels, state.generator)
        b = a.shape[0]
        draw = torch.rand(b, generator=state.generator, device="cpu")
        attacked = torch.nonzero(draw < self.rate).flatten().to(a.device)
        res = panum_perturb(model, images, clean, a, p, n, self.role, attacked, self.budget, state.generator,
                            state.adversary)
        k = attacked.numel()
        roles = {"a": a.clone(), "p": p.clone(), "n": n.clone()}
        member = roles[self.role]
        batch_labels = labels
        if k:
            batch_labels = torch.cat([labels, labels[member[attacked]]])
            member[attacked] = images.shape[0] + torch.arange(k, device=a.device)
        emb = model(torch.cat([images, res.x_adv]) if k else images)
        loss = triplet_loss(emb, roles["a"], roles["p"], roles["n"], gamma, reduction="nonzero_mean")
        value = float(loss.detach())
        history = res.pgd.history if res.pgd is not None else []
        stats = {
            "loss": value,
            "loss_adv": value,
            "pgd_iters": float(res.pgd.iterations.float().mean()) if res.pgd is not None else 0.0,
            "perturbed_frac": k / max(b, 1),
            "panum_objective_start": history[0] if history else 0.0,
            "panum_objective_end": history[-1] if history else 0.0,
        }
        self.last_batch = (batch_labels, roles)  # the enlarged batch's labels and tuple indices (diagnostics)
        return DefenseOutput(loss, stats, passes=(res.pgd.passes if res.pgd is not None else 0) + 1)
