"""Panum et al.'s robust formulation ("Exploring Adversarial Robustness of Deep Metric Learning").

A metric loss couples the samples of a batch, so perturbing the whole batch jointly lets anchor and
positive co-move, changes what the miner picks, and mismatches the test threat (clean references,
perturbed query). The robust step therefore:

1. mines tuples on the *clean* embeddings (eval mode, no grad) with the configured sampler
   (``loss.sampler``; Panum used pytorch-metric-learning's distance-weighted miner, the closest of our
   samplers is ``distance``);
2. picks one role per tuple (``defense.panum_role``: p, n or a) and, with probability rho
   (``defense.panum_rate``), replaces that member by an adversarial copy crafted against the fixed,
   detached clean embeddings of the other members:
   p: maximise ||f(x_p+δ) - sg f(x_a)||;  n: minimise ||f(x_n+δ) - sg f(x_a)||;
   a: maximise ||f(x_a+δ) - sg f(x_p)|| - ||f(x_a+δ) - sg f(x_n)||;
3. appends the copies to the batch with the same labels, redirects each attacked tuple's role index to
   its copy, and computes the triplet loss over the enlarged batch (gradient through clean and
   adversarial forwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rdml.attacks.pgd import Budget, PGDResult, frozen_eval, pgd
from rdml.config import DefenseConfig, LossConfig
from rdml.defenses.base import (
    Defense,
    DefenseOutput,
    StepState,
    benign_embeddings,
    mine,
    plain,
    require_triplet,
)
from rdml.losses import triplet_loss


@dataclass
class PanumResult:
    x_adv: Tensor  # [k, C, H, W] adversarial copies of the attacked tuples' role member
    attacked: Tensor  # [k] indices (into the tuple list) of the attacked tuples
    pgd: PGDResult | None


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
) -> PanumResult:
    """Craft adversarial copies of ``role`` for the tuples ``attacked`` against detached references."""
    if attacked.numel() == 0:
        return PanumResult(images[:0], attacked, None)
    model = plain(model)
    member = {"a": a, "p": p, "n": n}[role][attacked]
    refs = (clean[p[attacked]], clean[n[attacked]]) if role == "a" else (clean[a[attacked]], clean[a[attacked]])
    with frozen_eval(model):
        res = pgd(panum_objective(model, role, refs), images[member], budget, generator=generator)
    return PanumResult(res.x_adv, attacked, res)


class PanumRobust(Defense):
    """``defense.name=panum``: clean mining, one perturbed role per tuple at rate rho, enlarged batch."""

    name = "panum"

    def __init__(self, defense_cfg: DefenseConfig, loss_cfg: LossConfig, loss: nn.Module) -> None:
        super().__init__(defense_cfg, loss_cfg, loss)
        require_triplet("panum", loss_cfg)
        self.last_batch: tuple[Tensor, dict[str, Tensor]] | None = None

    def step(self, model: nn.Module, images: Tensor, labels: Tensor, state: StepState) -> DefenseOutput:
        cfg, gamma = self.cfg, float(self.loss_cfg.margin)
        clean = benign_embeddings(model, images)
        a, p, n = mine(clean, labels, self.loss_cfg.sampler, gamma, state)
        b = a.shape[0]
        draw = torch.rand(b, generator=state.generator, device="cpu")
        attacked = torch.nonzero(draw < cfg.panum_rate).flatten().to(a.device)
        res = panum_perturb(model, images, clean, a, p, n, cfg.panum_role, attacked, self.budget, state.generator)
        k = attacked.numel()
        roles = {"a": a.clone(), "p": p.clone(), "n": n.clone()}
        member = roles[cfg.panum_role]
        batch_labels = labels
        if k:
            batch_labels = torch.cat([labels, labels[member[attacked]]])
            member[attacked] = images.shape[0] + torch.arange(k, device=a.device)
        emb = model(torch.cat([images, res.x_adv]) if k else images)
        loss = triplet_loss(emb, roles["a"], roles["p"], roles["n"], gamma)
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
