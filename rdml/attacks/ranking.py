"""Ranking attacks (the RobRank suite and Panum et al.'s query attack) as attack objects over PGD objectives.

Threat model (Zhou et al., "Adversarial Ranking Attack and Defense", ECCV 2020, and "Adversarial Attack
and Defense in Deep Ranking", TPAMI 2024): the *gallery* (``Database``) is the benign, L2-normalised
embedding of the retrieval set, computed once; each attacked image (a query, or for CA a candidate) is
perturbed within an eps ball while the gallery stays clean. Each attack is a small class with

* ``setup(db, batch, generator)``: choose the targets from the *benign* gallery (seeded). How many
  numbers it draws may depend on the batch's size, its self rows and the gallery's size, never on
  embedding values (and ``skip_perturb`` mirrors ``perturb``'s draws): a shard of a sharded
  evaluation replays the earlier batches' draws from that alone (:mod:`rdml.eval.shards`);
* ``loss(emb, ctx)``: per-sample loss of the perturbed embeddings, minimised by :func:`pgd`;
* ``measure(adv, ctx)``: per-sample reported numbers in rdml's units (:mod:`rdml.metrics`): rank
  percentiles and R@1 as fractions, TMA a cosine, ES:D a distance;
* ``clean_reference`` / ``active``: the two per-attack choices of how a batch is run (ES measures its
  shift from the embedding of the clean images *as forwarded in the batch*; Panum's attack perturbs
  only the correctly retrieved queries);
* ``__call__(model, queries, labels, gallery=..., gallery_labels=...)``: the whole attack on a query
  set (:func:`rdml.attacks.runner.attack_queries`).

Each class declares what it reports (``reports``: unit, robust direction, the attacker's best value)
once; the metric registry, the printers and every check read it from there.

**Self.** When the queries are the gallery's own rows (``gallery=None``, rdml's zero-shot protocol on
the whole test set) each query's *own row* is its "self", identified by index (never "the nearest
item", which breaks on duplicates), and is excluded wherever a query must not find itself:

* the R@1 of ES:R, LTM, GTM and Panum's attack, and GTT's top-4, mask it;
* LTM's positives, GTM's and GTT's clean top-1, SP-QA's kept neighbours and the "top 1%" pools of CA-
  and QA- exclude it; CA+, QA+ and TMA never draw it as a target; Panum's target is the nearest *other*
  same-class item (``exclude_self=False``: the query's own clean embedding).

When the queries are not in the gallery (``gallery=...``: In-Shop's query/gallery protocol, or a user's
own gallery) there is no self and nothing is masked: every gallery item may be a target, a neighbour or
a top-1, and Panum's ``exclude_self=False`` targets the query's own clean embedding. A query may also be
told its gallery row explicitly (``query_index``, -1 for none).

Two reference-code bugs are *not* reproduced: GTM's target is the nearest gallery item whose label
differs from the label of the query's current top-1 (a global index, not a position inside a masked
subset), and LTM excludes the query itself from the positives.

Memory: per batch of n samples the attacks hold [n, N] distance rows (and [n, W, N] for CA), never an
N x N matrix, so SOP-size galleries work in batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rdml.attacks.base import Attack
from rdml.attacks.pgd import PGDResult, pgd, skip_draws
from rdml.attacks.profiles import AttackSpec
from rdml.metrics import COSINE, DISTANCE, FRACTION, HIGHER, LOWER, RATIO, MetricSpec

if TYPE_CHECKING:
    from rdml.attacks.runner import AttackOutcome

ES_OFFSET = 1e-6
"""Constant offset of the embedding-shift objectives of the ranking suite and training (ES, EST, Panum's query attack).

At the clean point the shift ||phi(x) - phi(x0)|| has no gradient, so the first step of every shift
attack depends on how that point is left. robrank adds +-1e-7 random noise to the reference on the
first iteration, but its distance is ``F.pairwise_distance``, which adds eps = 1e-6 to *every*
coordinate of the difference: robrank's effective offset is therefore the all-ones vector times 1e-6
(with +-10% noise), so its first step ascends along the constant direction of the embedding space.
rdml uses exactly that constant offset, without the noise: the attack is deterministic, and its
first step is robrank's up to the noise. The offset is negligible once the embedding has moved.
(The SHIFT clustering attack instead offsets every sample by 1e-6 times its own seeded random sign
vector: there all samples move at once, and a shared direction would scatter clusters far less.)
"""


def shift_distance(emb: Tensor, ref: Tensor) -> Tensor:
    """||emb - ref + ES_OFFSET·1|| per row: the embedding shift with robrank's effective offset (see ES_OFFSET)."""
    return torch.sqrt(((emb - ref + ES_OFFSET) ** 2).sum(dim=1))


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
    """The benign gallery: embeddings [N, D] and labels [N] on the attack device."""

    def __init__(self, embeddings: Tensor, labels: Tensor) -> None:
        self.emb = embeddings
        self.labels = labels.long()
        self.sq = (embeddings * embeddings).sum(dim=1)

    def __len__(self) -> int:
        return self.emb.shape[0]

    def dist(self, e: Tensor) -> Tensor:
        """Distances [n, N] from ``e`` to every gallery item."""
        return pairwise_distance(e, self.emb, self.sq)

    def dist_masked(self, e: Tensor, self_index: Tensor) -> Tensor:
        """Distances with each row's own entry (``self_index`` >= 0) set to +inf (no gradient needed)."""
        d = self.dist(e).clone()
        rows = torch.arange(len(self_index), device=d.device)
        has = self_index >= 0
        d[rows[has], self_index[has]] = math.inf
        return d


@dataclass
class Batch:
    """The attacked samples of one batch: their gallery rows ("self", -1 for none), labels, clean embeddings.

    ``clean_db`` are the samples' clean embeddings as the gallery has them (their gallery rows; for a
    query outside the gallery, its clean forward), used to pick targets so that targets do not depend
    on how the batch was formed; ``clean`` is the reference the attack measures from (ES: the clean
    images forwarded in this batch, so that eps = 0 gives an ES:D of exactly 0).
    """

    self_index: Tensor
    labels: Tensor
    clean: Tensor
    clean_db: Tensor

    @property
    def has_self(self) -> Tensor:
        return self.self_index >= 0

    def self_count(self) -> int:
        """1 when any row of the batch has a self in the gallery (one gallery item is never a candidate), else 0."""
        return int(bool(self.has_self.any()))


@dataclass
class Perturbed:
    """What PGD returned for one batch, and the embeddings of the adversarial inputs."""

    x_adv: Tensor
    emb: Tensor
    result: PGDResult


def _sample_excluding(n: int, high: int, exclude: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k indices per row, uniform over [0, high) without the row's ``exclude`` index (-1: nothing excluded)."""
    has = exclude >= 0
    if bool(has.all()):
        r = torch.randint(0, max(high - 1, 1), (n, k), generator=generator).to(exclude.device)
        return r + (r >= exclude.view(-1, 1)).long() * int(high > 1)
    free = torch.randint(0, high, (n, k), generator=generator).to(exclude.device)
    if not bool(has.any()):
        return free
    r = torch.randint(0, max(high - 1, 1), (n, k), generator=generator).to(exclude.device)
    shifted = r + (r >= exclude.view(-1, 1)).long() * int(high > 1)
    return torch.where(has.view(-1, 1), shifted, free)


def _sample_from_pool(pool: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k distinct entries per row of ``pool`` [n, m] (uniform; with replacement only if k > m)."""
    n, m = pool.shape
    if k <= m:
        order = torch.rand(n, m, generator=generator).argsort(dim=1)[:, :k].to(pool.device)
    else:
        order = torch.randint(0, m, (n, k), generator=generator).to(pool.device)
    return pool.gather(1, order)


def _top_fraction(db: Database, batch: Batch, k: int) -> Tensor:
    """Each row's top-max(k, 1%) nearest gallery items (benign), self excluded: [n, m]."""
    m = min(max(k, int(len(db) * 0.01)), len(db) - batch.self_count())
    d = db.dist_masked(batch.clean_db, batch.self_index)
    return d.topk(m, dim=1, largest=False).indices


def _top1_correct(adv: Tensor, db: Database, batch: Batch) -> Tensor:
    """Self-masked R@1 indicator (1.0 / 0.0) of the perturbed embeddings against the gallery.

    As in :mod:`rdml.eval.retrieval`, a tie between the nearest positive and the nearest negative
    counts for the positive, so eps = 0 reproduces the benign R@1.
    """
    d = db.dist_masked(adv, batch.self_index)
    same = db.labels.unsqueeze(0) == batch.labels.unsqueeze(1)
    near_pos = d.masked_fill(~same, math.inf).min(dim=1).values
    near_neg = d.masked_fill(same, math.inf).min(dim=1).values
    return (torch.isfinite(near_pos) & (near_pos <= near_neg)).float()


class RankingAttack(Attack):
    """Base class of the ranking attacks; subclasses define ``_setup``, ``loss``, ``measure`` and ``reports``."""

    threat = "ranking"

    # ---- the per-batch protocol (used by rdml.attacks.runner) -----------------------------------

    def clean_reference(self, model: nn.Module, x0: Tensor, clean_db: Tensor) -> Tensor:
        """The clean embedding the attack measures from: the gallery's copy (ES overrides: a fresh forward)."""
        return clean_db

    def setup(self, db: Database, batch: Batch, generator: torch.Generator) -> dict:
        """Targets from the benign gallery (seeded); the context also carries ``db`` and ``batch``."""
        ctx = self._setup(db, batch, generator)
        ctx.setdefault("db", db)
        ctx.setdefault("batch", batch)
        return ctx

    def _setup(self, db: Database, batch: Batch, generator: torch.Generator) -> dict:
        return {}

    def active(self, ctx: dict) -> Tensor | None:
        """Bool mask of samples to perturb (None: all). Panum's attack leaves wrong queries untouched."""
        return None

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        raise NotImplementedError

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    def skip_perturb(self, x0: Tensor, generator: torch.Generator | None) -> None:
        """Advance ``generator`` exactly as :meth:`perturb` on ``x0`` would (its random starts), without attacking.

        A subclass that draws differently in :meth:`perturb` must say so here too: sharded evaluation
        (:mod:`rdml.eval.shards`) replays the draws of the batches before a shard with it.
        """
        skip_draws(x0, self.budget, generator)

    def perturb(self, model: nn.Module, x0: Tensor, ctx: dict, generator: torch.Generator | None) -> Perturbed:
        """PGD on :meth:`loss` from the clean batch; samples outside :meth:`active` keep their clean input.

        The embedding of the final adversarial batch is the engine's own last evaluation of the
        objective (no extra forward), except with restarts, where the kept restart need not be the last.
        """
        active = self.active(ctx)
        stash: dict[str, Tensor] = {}

        def objective(x: Tensor) -> Tensor:
            emb = model(x)
            stash["emb"] = emb.detach()
            return self.loss(emb, ctx)

        done = None if active is None else (lambda x, losses: ~active)
        res = pgd(objective, x0, self.budget, done=done, generator=generator)
        if self.restarts > 1 or "emb" not in stash:
            with torch.no_grad():
                stash["emb"] = model(res.x_adv)
        adv_x, adv = res.x_adv, stash["emb"]
        if active is not None:
            adv_x = torch.where(active.view(-1, *([1] * (x0.dim() - 1))), adv_x, x0)
            adv = torch.where(active.view(-1, 1), adv, ctx["batch"].clean)
        return Perturbed(adv_x, adv, res)

    # ---- the whole attack on a query set ------------------------------------------------------

    def __call__(self, model: nn.Module, queries: Any, labels: Any = None, *, gallery: Any = None,
                 gallery_labels: Any = None, query_index: Any = None, batch_size: int = 128,
                 device: str | torch.device | None = None, seed: int = 0, normalize: bool | None = None,
                 keep_images: bool = True, progress: bool = False) -> AttackOutcome:
        """Attack every query against the clean gallery; returns the adversarial inputs and the metric.

        ``queries``: images [n, C, H, W] in [0, 1] (with ``labels`` [n]) or a dataset yielding
        ``(image, label, ...)``. ``gallery=None``: the queries are the gallery (each query's own row is
        its "self", see the module docstring); else a tensor (with ``gallery_labels``) or a dataset.
        ``normalize``: None compares embeddings on the unit sphere, L2-normalising the model's output
        when it is not normalised already (True: always, False: never). The result holds ``adv``
        (adversarial inputs, CPU), ``values`` (per query), ``mean`` and ``targets``.
        """
        from rdml.attacks.runner import attack_queries

        return attack_queries(self, model, queries, labels, gallery=gallery, gallery_labels=gallery_labels,
                              query_index=query_index, batch_size=batch_size, device=device, seed=seed,
                              normalize=normalize, keep_images=keep_images, progress=progress)


class CandidateAttack(RankingAttack):
    """CA+/CA-: perturb a candidate to raise (+) or lower (-) its rank in W queries' lists.

    Options: ``pm`` ('+' or '-'), ``W`` (queries per candidate). CA+ draws the W queries uniformly from
    the gallery (never the candidate's own row), CA- from the candidate's top 1% nearest gallery items.
    """

    kind = "CA"
    options = ("pm", "W")
    reports = {
        "CA+": MetricSpec("CA+", FRACTION, HIGHER, "rank percentile of the candidate, raised, in W random queries", 0.0),
        "CA-": MetricSpec("CA-", FRACTION, LOWER, "rank percentile of the candidate, lowered, in W near queries", 1.0),
    }

    def _setup(self, db: Database, batch: Batch, generator: torch.Generator) -> dict:
        n, W = len(batch.self_index), self.spec.W
        if self.spec.pm == "+":  # W queries uniform over the gallery (global sampling)
            queries = _sample_excluding(n, len(db), batch.self_index, W, generator)
        else:  # W queries from the candidate's own top 1%, self excluded
            queries = _sample_from_pool(_top_fraction(db, batch, W), W, generator)
        q = db.emb[queries]  # [n, W, D]
        ref = db.dist(q.reshape(n * W, -1)).view(n, W, -1)  # d(x, q) for every x: [n, W, N]
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
        return {self.spec.base_name: ahead.mean(dim=1)}


class QueryAttack(RankingAttack):
    """QA+/QA-: perturb a query to raise (+) or lower (-) M targets in its ranking.

    Options: ``pm`` ('+' or '-'), ``M`` (targets per query). QA+ draws the targets uniformly from the
    gallery (never the query's own row), QA- from the query's top 1% nearest gallery items.
    """

    kind = "QA"
    options = ("pm", "M")
    reports = {
        "QA+": MetricSpec("QA+", FRACTION, HIGHER, "rank percentile of M random targets, raised, in the query's list", 0.0),
        "QA-": MetricSpec("QA-", FRACTION, LOWER, "rank percentile of M near targets, lowered, in the query's list", 1.0),
    }

    def _targets(self, db: Database, batch: Batch, generator: torch.Generator) -> Tensor:
        n, M = len(batch.self_index), self.spec.M
        if self.spec.pm == "+":
            return _sample_excluding(n, len(db), batch.self_index, M, generator)
        return _sample_from_pool(_top_fraction(db, batch, M), M, generator)

    def _setup(self, db: Database, batch: Batch, generator: torch.Generator) -> dict:
        return {"targets": self._targets(db, batch, generator)}

    @staticmethod
    def _qa(dq: Tensor, targets: Tensor, pm: str) -> tuple[Tensor, Tensor]:
        """(per-sample QA loss, per-sample target rank percentile as a fraction) from distances dq [n, N]."""
        a = dq.gather(1, targets)  # [n, M]
        gap = a.unsqueeze(2) - dq.unsqueeze(1)  # d(q~, c) - d(q~, x)
        loss = (gap if pm == "+" else -gap).clamp_min(0.0).mean(dim=(1, 2))
        prank = (dq.unsqueeze(1) < a.unsqueeze(2)).float().mean(dim=2).mean(dim=1)
        return loss, prank.detach()

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        return self._qa(ctx["db"].dist(emb), ctx["targets"], self.spec.pm)[0]

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        return {self.spec.base_name: self._qa(ctx["db"].dist(adv), ctx["targets"], self.spec.pm)[1]}


class SemanticPreservingQueryAttack(QueryAttack):
    """SP-QA (ECCV 2020): QA plus xi * QA+ on the query's 5 original neighbours, to keep them on top.

    Options: ``pm``, ``M`` and ``xi_k``. The kept neighbours exclude the attack's own targets (the
    reference code can ask to keep on top the very item SP-QA- pushes down). xi is RobRank's dynamic
    weight min(exp(xi_k L_sp), 1e9), per sample and detached.
    """

    kind = "SPQA"
    options = ("pm", "M", "xi_k")
    reports = {
        "SPQA+": MetricSpec("SPQA+", FRACTION, HIGHER, "QA+ that keeps the query's 5 neighbours on top", 0.0),
        "SPQA-": MetricSpec("SPQA-", FRACTION, LOWER, "QA- that keeps the query's 5 neighbours on top", 1.0),
        "SPQA+:GT": MetricSpec("SPQA+:GT", FRACTION, None, "rank percentile of the 5 kept neighbours (SPQA+)"),
        "SPQA-:GT": MetricSpec("SPQA-:GT", FRACTION, None, "rank percentile of the 5 kept neighbours (SPQA-)"),
    }

    GT = 5

    def _setup(self, db: Database, batch: Batch, generator: torch.Generator) -> dict:
        ctx = super()._setup(db, batch, generator)
        d = db.dist_masked(batch.clean_db, batch.self_index)
        d.scatter_(1, ctx["targets"], math.inf)  # never ask to keep on top what the attack pushes down
        k = min(self.GT, len(db) - batch.self_count() - ctx["targets"].shape[1])
        ctx["gt"] = d.topk(k, largest=False).indices
        return ctx

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        dq = ctx["db"].dist(emb)
        qa, _ = self._qa(dq, ctx["targets"], self.spec.pm)
        sp, _ = self._qa(dq, ctx["gt"], "+")
        xi = torch.exp(self.spec.xi_k * sp.detach()).clamp(max=1e9)
        return qa + xi * sp

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        dq = ctx["db"].dist(adv)
        name = self.spec.base_name
        return {name: self._qa(dq, ctx["targets"], self.spec.pm)[1], f"{name}:GT": self._qa(dq, ctx["gt"], "+")[1]}


class TargetedMismatchAttack(RankingAttack):
    """TMA: pull the query's embedding onto a random gallery embedding (never its own row); reports their cosine."""

    kind = "TMA"
    reports = {"TMA": MetricSpec("TMA", COSINE, LOWER, "cosine of the query to a random target it is pulled onto", 1.0)}

    def _setup(self, db: Database, batch: Batch, generator: torch.Generator) -> dict:
        target = _sample_excluding(len(batch.self_index), len(db), batch.self_index, 1, generator).squeeze(1)
        return {"t": db.emb[target], "targets": target.view(-1, 1)}

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        return 1.0 - F.cosine_similarity(emb, ctx["t"], dim=1)

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        return {"TMA": F.cosine_similarity(adv, ctx["t"], dim=1)}


class EmbeddingShiftAttack(RankingAttack):
    """ES: push the query's embedding as far as possible from its clean embedding.

    ES:D = ||phi(q~) - phi(q)|| and ES:R = R@1 (a fraction) of q~ against the gallery with self masked.
    The reference phi(q) is the clean images' embedding as forwarded in the attacked batch (so eps = 0
    gives an ES:D of exactly 0, whatever batching computed the gallery).
    """

    kind = "ES"
    reports = {
        "ES:D": MetricSpec("ES:D", DISTANCE, LOWER, "distance the query's embedding moved", 2.0),
        "ES:R": MetricSpec("ES:R", FRACTION, HIGHER, "R@1 of the shifted query (self excluded)", 0.0),
        "ES:D/spread": MetricSpec("ES:D/spread", RATIO, LOWER, "ES:D over the clean embedding's RMS pairwise distance"),
    }

    def clean_reference(self, model: nn.Module, x0: Tensor, clean_db: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x0)

    def _setup(self, db: Database, batch: Batch, generator: torch.Generator) -> dict:
        return {"ref": batch.clean}

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        return -shift_distance(emb, ctx["ref"])

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        shift = (adv - ctx["ref"]).norm(dim=1)
        return {"ES:D": shift, "ES:R": _top1_correct(adv, ctx["db"], ctx["batch"])}


class LearningToMisrankAttack(RankingAttack):
    """LTM: pull the farthest negative in front of the nearest positive (self excluded from positives)."""

    kind = "LTM"
    reports = {"LTM": MetricSpec("LTM", FRACTION, HIGHER, "R@1 after pulling the farthest negative in front", 0.0)}

    def _setup(self, db: Database, batch: Batch, generator: torch.Generator) -> dict:
        same = db.labels.unsqueeze(0) == batch.labels.unsqueeze(1)  # [n, N]
        pos = same.clone()
        rows = torch.arange(len(batch.self_index), device=pos.device)
        has = batch.has_self
        pos[rows[has], batch.self_index[has]] = False
        return {"pos": pos, "neg": ~same}

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        d = ctx["db"].dist(emb)
        far_neg = d.masked_fill(~ctx["neg"], -math.inf).max(dim=1).values
        near_pos = d.masked_fill(~ctx["pos"], math.inf).min(dim=1).values
        valid = torch.isfinite(far_neg) & torch.isfinite(near_pos)
        gap = torch.where(valid, far_neg - near_pos, torch.zeros_like(far_neg))
        return gap.clamp_min(0.0)

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        return {"LTM": _top1_correct(adv, ctx["db"], ctx["batch"])}


class GreedyTop1MisrankAttack(RankingAttack):
    """GTM: pull in the nearest gallery item whose label differs from the query's current top-1's."""

    kind = "GTM"
    reports = {
        "GTM": MetricSpec("GTM", FRACTION, HIGHER, "R@1 after pulling in the nearest other-label item", 0.0),
        "GTM|correct": MetricSpec("GTM|correct", FRACTION, HIGHER, "GTM over the queries retrieved correctly before", 0.0),
    }

    def _setup(self, db: Database, batch: Batch, generator: torch.Generator) -> dict:
        d = db.dist_masked(batch.clean_db, batch.self_index)
        top1_label = db.labels[d.argmin(dim=1)]
        d = d.masked_fill(db.labels.unsqueeze(0) == top1_label.unsqueeze(1), math.inf)
        target = d.argmin(dim=1)  # a global gallery index
        return {"t": db.emb[target], "targets": target.view(-1, 1)}

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        return torch.sqrt(((emb - ctx["t"]) ** 2).sum(dim=1) + 1e-12)

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        return {"GTM": _top1_correct(adv, ctx["db"], ctx["batch"])}


class GreedyTop1TranslocationAttack(RankingAttack):
    """GTT: push the query's original top-1 (non-self) neighbour down; reports retain@4 (a fraction)."""

    kind = "GTT"
    reports = {"GTT": MetricSpec("GTT", FRACTION, HIGHER, "share of queries whose top-1 stays in the top 4", 0.0)}

    K = 4

    def _setup(self, db: Database, batch: Batch, generator: torch.Generator) -> dict:
        top1 = db.dist_masked(batch.clean_db, batch.self_index).argmin(dim=1)
        return {"targets": top1.view(-1, 1)}

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        return QueryAttack._qa(ctx["db"].dist(emb), ctx["targets"], "-")[0]

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        db, batch = ctx["db"], ctx["batch"]
        k = min(self.K, len(db) - batch.self_count())
        topk = db.dist_masked(adv, batch.self_index).topk(k, largest=False).indices
        return {"GTT": (topk == ctx["targets"]).any(dim=1).float()}


class PanumQueryAttack(RankingAttack):
    """Panum et al.'s query attack: move correctly retrieved queries away from their nearest positive.

    Only queries whose clean top-1 (self excluded) has the right label are perturbed; the objective
    maximises the L2 distance to the clean embedding of the nearest same-class gallery item (the query
    itself excluded). Option ``exclude_self=False`` targets the query's own clean embedding instead
    (the reference code's displacement behaviour). Reported: adversarial R@1 (a fraction) over *all*
    queries, i.e. P@1 of the perturbed queries against the clean gallery.
    """

    kind = "PANUM"
    options = ("exclude_self",)
    reports = {
        "PANUM": MetricSpec("PANUM", FRACTION, HIGHER, "R@1 of correctly retrieved queries pushed from their positive", 0.0),
        "PANUM:clean": MetricSpec("PANUM:clean", FRACTION, HIGHER, "clean R@1 of the attacked queries"),
    }

    def _setup(self, db: Database, batch: Batch, generator: torch.Generator) -> dict:
        d = db.dist_masked(batch.clean_db, batch.self_index)
        correct = db.labels[d.argmin(dim=1)] == batch.labels
        has = batch.has_self
        if not self.spec.exclude_self:
            rows = torch.arange(len(batch.self_index), device=d.device)
            d[rows[has], batch.self_index[has]] = 0.0
        d = d.masked_fill(db.labels.unsqueeze(0) != batch.labels.unsqueeze(1), math.inf)
        target = d.argmin(dim=1)
        t = db.emb[target]
        if not self.spec.exclude_self and not bool(has.all()):  # no gallery row: the own clean embedding
            t = torch.where(has.view(-1, 1), t, batch.clean_db)
            target = torch.where(has, target, torch.full_like(target, -1))
        return {"t": t, "targets": target.view(-1, 1), "correct": correct}

    def active(self, ctx: dict) -> Tensor | None:
        return ctx["correct"]

    def loss(self, emb: Tensor, ctx: dict) -> Tensor:
        return -shift_distance(emb, ctx["t"])

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        hit = _top1_correct(adv, ctx["db"], ctx["batch"]) * ctx["correct"].float()
        return {"PANUM": hit, "PANUM:clean": ctx["correct"].float()}


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


def build_ranking_attack(spec: AttackSpec, key: str | None = None) -> RankingAttack:
    """The attack object of a ranking spec."""
    if spec.kind not in ATTACKS:
        raise ValueError(f"{spec.kind} is not a ranking attack")
    return ATTACKS[spec.kind].from_spec(spec, key)  # type: ignore[return-value]
