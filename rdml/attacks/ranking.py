"""Ranking attacks (RobRank suite and Panum et al.'s query attack) as PGD objectives.

Threat model (hm-robrank.md section 2): the database is the benign, L2-normalised embedding of the
whole test set, computed once; each test image in turn is the perturbed query (or candidate). Each
attack is a small class with three methods:

* ``setup(batch, generator)``: choose the targets from the *benign* database (seeded);
* ``loss(emb, ctx)``: per-sample loss of the perturbed embeddings, minimised by :func:`pgd`;
* ``measure(adv, ctx)``: per-sample reported numbers (percentiles and R@1 in %, TMA cosine, ES:D).

"Self" is always the attacked sample's own database index, never "the nearest item" (the reference
code's assumption breaks on duplicates). Two reference-code bugs are *not* reproduced: GTM's target is
the nearest database item whose label differs from the label of the query's current top-1 (a global
index, not a position inside a masked subset), and LTM excludes the query itself from the positives.

Memory: per batch of n samples the attacks hold [n, N] distance rows (and [n, W, N] for CA), never an
N x N matrix, so SOP-size databases work in batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rdml.attacks.profiles import AttackSpec

ES_OFFSET = 1e-7
"""Offset of the ES reference, so that the shift's gradient at the clean point is not 0 (RobRank)."""


def pairwise_distance(a: Tensor, b: Tensor, b_sq: Tensor | None = None) -> Tensor:
    """Euclidean distances [n, N] between rows of ``a`` and ``b`` (differentiable in ``a``).

    The matmul form keeps memory at n x N; the clamp keeps the gradient finite at distance 0 (there it
    is exactly 0, as for the reference's own database entry at the clean point).
    """
    a_sq = (a * a).sum(dim=1, keepdim=True)
    b_sq = (b * b).sum(dim=1) if b_sq is None else b_sq
    sq = a_sq + b_sq.unsqueeze(0) - 2.0 * (a @ b.t())
    return torch.sqrt(sq.clamp_min(0.0) + 1e-12)


class Database:
    """The benign database: embeddings [N, D] and labels [N] on the attack device."""

    def __init__(self, embeddings: Tensor, labels: Tensor) -> None:
        self.emb = embeddings
        self.labels = labels.long()
        self.sq = (embeddings * embeddings).sum(dim=1)

    def __len__(self) -> int:
        return self.emb.shape[0]

    def dist(self, e: Tensor) -> Tensor:
        """Distances [n, N] from ``e`` to every database item."""
        return pairwise_distance(e, self.emb, self.sq)

    def dist_masked(self, e: Tensor, self_idx: Tensor) -> Tensor:
        """Distances with each row's own entry set to +inf (no gradient needed)."""
        d = self.dist(e).clone()
        d[torch.arange(len(self_idx), device=d.device), self_idx] = math.inf
        return d


@dataclass
class Batch:
    """The attacked samples of one batch: database indices ("self"), labels, clean embeddings.

    ``clean_db`` are the samples' database rows (used to pick targets, so targets do not depend on
    how the batch was formed); ``clean`` are the embeddings of the clean images forwarded in this
    batch (ES's reference, so that eps = 0 gives an ES:D of exactly 0).
    """

    idx: Tensor
    labels: Tensor
    clean: Tensor
    clean_db: Tensor


def _sample_excluding(n: int, high: int, exclude: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k indices per row, uniform over [0, high) without the row's ``exclude`` index."""
    r = torch.randint(0, max(high - 1, 1), (n, k), generator=generator).to(exclude.device)
    return r + (r >= exclude.view(-1, 1)).long() * int(high > 1)


def _sample_from_pool(pool: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k distinct entries per row of ``pool`` [n, m] (uniform; with replacement only if k > m)."""
    n, m = pool.shape
    if k <= m:
        order = torch.rand(n, m, generator=generator).argsort(dim=1)[:, :k].to(pool.device)
    else:
        order = torch.randint(0, m, (n, k), generator=generator).to(pool.device)
    return pool.gather(1, order)


def _top_fraction(db: Database, batch: Batch, k: int) -> Tensor:
    """Each row's top-max(k, 1%) nearest database items (benign), self excluded: [n, m]."""
    m = min(max(k, int(len(db) * 0.01)), len(db) - 1)
    d = db.dist_masked(batch.clean_db, batch.idx)
    return d.topk(m, dim=1, largest=False).indices


def _top1_correct(adv: Tensor, db: Database, batch: Batch) -> Tensor:
    """Self-masked R@1 indicator (1.0 / 0.0) of the perturbed embeddings against the database.

    As in :mod:`rdml.eval.retrieval`, a tie between the nearest positive and the nearest negative
    counts for the positive, so eps = 0 reproduces the benign R@1.
    """
    d = db.dist_masked(adv, batch.idx)
    same = db.labels.unsqueeze(0) == batch.labels.unsqueeze(1)
    near_pos = d.masked_fill(~same, math.inf).min(dim=1).values
    near_neg = d.masked_fill(same, math.inf).min(dim=1).values
    return (torch.isfinite(near_pos) & (near_pos <= near_neg)).float()


class RankingAttack:
    """Base class; subclasses define ``setup``, ``loss`` and ``measure``."""

    def __init__(self, spec: AttackSpec, db: Database) -> None:
        self.spec = spec
        self.db = db

    def setup(self, batch: Batch, generator: torch.Generator) -> dict:
        return {}

    def active(self, ctx: dict) -> Tensor | None:
        """Bool mask of samples to perturb (None: all). Panum leaves wrong queries untouched."""
        return None

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        raise NotImplementedError

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        raise NotImplementedError


class CandidateAttack(RankingAttack):
    """CA+/CA-: perturb a candidate to raise (+) or lower (-) its rank in W queries' lists."""

    def setup(self, batch: Batch, generator: torch.Generator) -> dict:
        n, W = len(batch.idx), self.spec.W
        if self.spec.pm == "+":  # W queries uniform over the database (global sampling)
            queries = _sample_excluding(n, len(self.db), batch.idx, W, generator)
        else:  # W queries from the candidate's own top 1%, self excluded
            queries = _sample_from_pool(_top_fraction(self.db, batch, W), W, generator)
        q = self.db.emb[queries]  # [n, W, D]
        ref = self.db.dist(q.reshape(n * W, -1)).view(n, W, -1)  # d(x, q) for every x: [n, W, N]
        return {"q": q, "ref": ref, "targets": queries}

    def _dq(self, emb: Tensor, ctx: dict) -> Tensor:
        q = ctx["q"]
        diff = emb.unsqueeze(1) - q
        return torch.sqrt((diff * diff).sum(dim=2) + 1e-12)  # [n, W]

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        gap = self._dq(emb, ctx).unsqueeze(2) - ctx["ref"]  # d(c~, q) - d(x, q)
        if self.spec.pm == "-":
            gap = -gap
        return gap.clamp_min(0.0).mean(dim=(1, 2))

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        ahead = (ctx["ref"] < self._dq(adv, ctx).unsqueeze(2)).float().mean(dim=2)  # [n, W]
        return {self.spec.base_name: 100.0 * ahead.mean(dim=1)}


class QueryAttack(RankingAttack):
    """QA+/QA-: perturb a query to raise (+) or lower (-) M targets in its ranking."""

    def _targets(self, batch: Batch, generator: torch.Generator) -> Tensor:
        n, M = len(batch.idx), self.spec.M
        if self.spec.pm == "+":
            return _sample_excluding(n, len(self.db), batch.idx, M, generator)
        return _sample_from_pool(_top_fraction(self.db, batch, M), M, generator)

    def setup(self, batch: Batch, generator: torch.Generator) -> dict:
        return {"targets": self._targets(batch, generator)}

    @staticmethod
    def _qa(dq: Tensor, targets: Tensor, pm: str) -> tuple[Tensor, Tensor]:
        """(per-sample QA loss, per-sample target percentile in %) from distances dq [n, N]."""
        a = dq.gather(1, targets)  # [n, M]
        gap = a.unsqueeze(2) - dq.unsqueeze(1)  # d(q~, c) - d(q~, x)
        loss = (gap if pm == "+" else -gap).clamp_min(0.0).mean(dim=(1, 2))
        prank = (dq.unsqueeze(1) < a.unsqueeze(2)).float().mean(dim=2).mean(dim=1)
        return loss, 100.0 * prank.detach()

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        return self._qa(self.db.dist(emb), ctx["targets"], self.spec.pm)[0]

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        return {self.spec.base_name: self._qa(self.db.dist(adv), ctx["targets"], self.spec.pm)[1]}


class SemanticPreservingQueryAttack(QueryAttack):
    """SP-QA (ECCV 2020): QA plus xi * QA+ on the query's 5 original neighbours, to keep them on top.

    xi is RobRank's dynamic weight min(exp(k L_sp), 1e9), per sample and detached.
    """

    GT = 5

    def setup(self, batch: Batch, generator: torch.Generator) -> dict:
        ctx = super().setup(batch, generator)
        k = min(self.GT, len(self.db) - 1)
        ctx["gt"] = self.db.dist_masked(batch.clean_db, batch.idx).topk(k, largest=False).indices
        return ctx

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        dq = self.db.dist(emb)
        qa, _ = self._qa(dq, ctx["targets"], self.spec.pm)
        sp, _ = self._qa(dq, ctx["gt"], "+")
        xi = torch.exp(self.spec.xi_k * sp.detach()).clamp(max=1e9)
        return qa + xi * sp

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        dq = self.db.dist(adv)
        name = self.spec.base_name
        return {name: self._qa(dq, ctx["targets"], self.spec.pm)[1], f"{name}:GT": self._qa(dq, ctx["gt"], "+")[1]}


class TargetedMismatchAttack(RankingAttack):
    """TMA: pull the query's embedding onto a random database embedding; reports their cosine."""

    def setup(self, batch: Batch, generator: torch.Generator) -> dict:
        target = _sample_excluding(len(batch.idx), len(self.db), batch.idx, 1, generator).squeeze(1)
        return {"t": self.db.emb[target], "targets": target.view(-1, 1)}

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        return 1.0 - F.cosine_similarity(emb, ctx["t"], dim=1)

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        return {"TMA": F.cosine_similarity(adv, ctx["t"], dim=1)}


class EmbeddingShiftAttack(RankingAttack):
    """ES: push the query's embedding as far as possible from its clean embedding.

    ES:D = ||phi(q~) - phi(q)|| and ES:R = R@1 (%) of q~ against the database with self masked.
    """

    def setup(self, batch: Batch, generator: torch.Generator) -> dict:
        noise = torch.randint(-1, 2, batch.clean.shape, generator=generator).to(batch.clean)
        return {"ref": batch.clean, "ref_off": batch.clean + ES_OFFSET * noise, "batch": batch}

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        return -torch.sqrt(((emb - ctx["ref_off"]) ** 2).sum(dim=1) + 1e-20)

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        shift = (adv - ctx["ref"]).norm(dim=1)
        return {"ES:D": shift, "ES:R": 100.0 * _top1_correct(adv, self.db, ctx["batch"])}


class LearningToMisrankAttack(RankingAttack):
    """LTM: pull the farthest negative in front of the nearest positive (self excluded from positives)."""

    def setup(self, batch: Batch, generator: torch.Generator) -> dict:
        same = self.db.labels.unsqueeze(0) == batch.labels.unsqueeze(1)  # [n, N]
        pos = same.clone()
        pos[torch.arange(len(batch.idx), device=pos.device), batch.idx] = False
        return {"pos": pos, "neg": ~same, "batch": batch}

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        d = self.db.dist(emb)
        far_neg = d.masked_fill(~ctx["neg"], -math.inf).max(dim=1).values
        near_pos = d.masked_fill(~ctx["pos"], math.inf).min(dim=1).values
        valid = torch.isfinite(far_neg) & torch.isfinite(near_pos)
        gap = torch.where(valid, far_neg - near_pos, torch.zeros_like(far_neg))
        return gap.clamp_min(0.0)

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        return {"LTM": 100.0 * _top1_correct(adv, self.db, ctx["batch"])}


class GreedyTop1MisrankAttack(RankingAttack):
    """GTM: pull in the nearest database item whose label differs from the query's current top-1's."""

    def setup(self, batch: Batch, generator: torch.Generator) -> dict:
        d = self.db.dist_masked(batch.clean_db, batch.idx)
        top1_label = self.db.labels[d.argmin(dim=1)]
        d = d.masked_fill(self.db.labels.unsqueeze(0) == top1_label.unsqueeze(1), math.inf)
        target = d.argmin(dim=1)  # a global database index
        return {"t": self.db.emb[target], "targets": target.view(-1, 1), "batch": batch}

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        return torch.sqrt(((emb - ctx["t"]) ** 2).sum(dim=1) + 1e-12)

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        return {"GTM": 100.0 * _top1_correct(adv, self.db, ctx["batch"])}


class GreedyTop1TranslocationAttack(RankingAttack):
    """GTT: push the query's original top-1 (non-self) neighbour down; reports retain@4 (%)."""

    K = 4

    def setup(self, batch: Batch, generator: torch.Generator) -> dict:
        top1 = self.db.dist_masked(batch.clean_db, batch.idx).argmin(dim=1)
        return {"targets": top1.view(-1, 1), "batch": batch}

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        return QueryAttack._qa(self.db.dist(emb), ctx["targets"], "-")[0]

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        k = min(self.K, len(self.db) - 1)
        topk = self.db.dist_masked(adv, ctx["batch"].idx).topk(k, largest=False).indices
        return {"GTT": 100.0 * (topk == ctx["targets"]).any(dim=1).float()}


class PanumQueryAttack(RankingAttack):
    """Panum et al.'s query attack: move correctly retrieved queries away from their nearest positive.

    Only queries whose clean top-1 (self excluded) has the right label are perturbed; the objective
    maximises the L2 distance to the clean embedding of the nearest same-class reference (the query
    itself excluded unless ``exclude_self=False``, which reproduces the reference code's
    displacement behaviour). Reported: adversarial R@1 (%) over *all* queries, i.e. P@1 of the
    perturbed queries against the clean reference set.
    """

    def setup(self, batch: Batch, generator: torch.Generator) -> dict:
        d = self.db.dist_masked(batch.clean_db, batch.idx)
        correct = self.db.labels[d.argmin(dim=1)] == batch.labels
        if not self.spec.exclude_self:
            d[torch.arange(len(batch.idx), device=d.device), batch.idx] = 0.0
        d = d.masked_fill(self.db.labels.unsqueeze(0) != batch.labels.unsqueeze(1), math.inf)
        target = d.argmin(dim=1)
        noise = torch.randint(-1, 2, batch.clean.shape, generator=generator).to(batch.clean)
        t = self.db.emb[target] + ES_OFFSET * noise
        return {"t": t, "targets": target.view(-1, 1), "correct": correct, "batch": batch}

    def active(self, ctx: dict) -> Tensor | None:
        return ctx["correct"]

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        return -torch.sqrt(((emb - ctx["t"]) ** 2).sum(dim=1) + 1e-20)

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        hit = _top1_correct(adv, self.db, ctx["batch"]) * ctx["correct"].float()
        return {"PANUM": 100.0 * hit, "PANUM:clean": 100.0 * ctx["correct"].float()}


ATTACKS: dict[str, type[RankingAttack]] = {
    "CA": CandidateAttack,
    "QA": QueryAttack,
    "SPQA": SemanticPreservingQueryAttack,
    "TMA": TargetedMismatchAttack,
    "ES": EmbeddingShiftAttack,
    "LTM": LearningToMisrankAttack,
    "GTM": GreedyTop1MisrankAttack,
    "GTT": GreedyTop1TranslocationAttack,
    "PANUM": PanumQueryAttack,
}


def build_ranking_attack(spec: AttackSpec, db: Database) -> RankingAttack:
    """The attack object for a ranking spec."""
    if spec.kind not in ATTACKS:
        raise ValueError(f"{spec.kind} is not a ranking attack")
    return ATTACKS[spec.kind](spec, db)
