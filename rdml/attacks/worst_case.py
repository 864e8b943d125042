"""The worst-case ranking suite: every attacked item judged by its worst ranking over many attacks.

ERS averages ten fixed-step attacks, each reporting its own number; a model can score well on every one
of them while each query is broken by *some* attack. In the spirit of AutoAttack (Croce & Hein, ICML
2020), the worst-case suite (profiles ``worst28`` / ``worst224``, docs/methods.md#worst-case-suite)
judges every attacked item by the ranking metric a retrieval user sees, after every attack of the suite,
and keeps per item the **worst** value:

* the items are the attacked queries; for a candidate-side attack (CA) the perturbed candidate, used as
  a query. Each is searched against the clean gallery, its own row excluded (``self``, as in the benign
  metrics), giving the rank of its true match (its nearest positive), its R@1 and its AP
  (:func:`probe_ranks`, the formulas of :mod:`rdml.eval.retrieval`; a tie counts for the positive);
* the suite is the profile's white-box attacks (rob28's ten fixed-step attacks and the same objectives
  with APGD's step-size-free rule, ``step_rule="apgd"`` of the one PGD engine), a query-only black-box
  random search (:mod:`rdml.attacks.blackbox`) and transfer attacks crafted on a surrogate model
  (:mod:`rdml.eval.worst_case`), plus the clean item itself, so the worst case is never better than
  the benign value and an item no attack moved keeps exactly its benign value;
* the black-box and transfer attacks also check for gradient masking: a weaker attack that beats the
  white-box worst case flags the model (:mod:`rdml.eval.worst_case`).

This module holds the per-item probe, the *probed* attack classes (each ranking attack class with the
probe added to what it measures, so the probe sees exactly the embedding the attack reports on) and
:class:`WorstCaseSuite`, the suite as an API object. The evaluation driver is
:func:`rdml.eval.robustness.evaluate_robustness`, which runs any profile with a ``worst_case`` section
through :mod:`rdml.eval.worst_case`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rdml.attacks.profiles import AttackProfile, AttackSpec, BlackBoxSettings, load_profile
from rdml.attacks.ranking import ATTACKS, Batch, Database, Perturbed, RankingAttack
from rdml.errors import ConfigError

PROBE = "wc."
"""Prefix of the probe's numbers among an attack's measured values (``<key>:wc.recall@1`` in the runner's
naming); :func:`split_probe` takes them out again, so they never appear as ``attacks.*`` metrics."""

PROBE_METRICS = ("rank", "recall@1", "map", "moved")
"""Per attacked item: rank of its true match, R@1, AP (fractions; NaN without a positive) and whether the
attack moved its input at all (1.0 / 0.0)."""

WORST_METRICS = ("recall@1", "map", "rank")
"""The ranking metrics an item is judged by, worst case over the suite (``worst.<metric>``)."""


def probe_ranks(emb: Tensor, db: Database, self_index: Tensor, labels: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The sorted 1-based ranks of each item's positives when ``emb`` queries the clean gallery ``db``.

    Returns ``(ranks float64 [n, m], num_pos int64 [n])`` in the layout of
    :func:`rdml.eval.ranks.positive_ranks` (columns past an item's ``num_pos`` are inf), so
    :func:`rdml.eval.retrieval.per_query_from_ranks` turns them into R@1 and AP with the benign formulas.
    The item's own gallery row (``self_index`` >= 0) is neither a positive nor a negative; rank j of the
    j-th nearest positive is j plus the number of negatives *strictly* closer (a tie counts for the
    positive). The distances are the attacks' own (:meth:`Database.dist_masked`), so the R@1 here is,
    bit for bit, the R@1 that ES:R, LTM and GTM report on the same embedding.
    """
    d = db.dist_masked(emb, self_index)
    same = db.labels.unsqueeze(0) == labels.unsqueeze(1)
    pos = same.clone()
    rows = torch.arange(len(self_index), device=d.device)
    has = self_index >= 0
    pos[rows[has], self_index[has]] = False
    num_pos = pos.sum(dim=1)
    width = max(int(num_pos.max()) if len(num_pos) else 0, 1)
    pos_d = d.masked_fill(~pos, math.inf).sort(dim=1).values[:, :width].contiguous()
    neg_d = d.masked_fill(same, math.inf).sort(dim=1).values.contiguous()
    closer = torch.searchsorted(neg_d, pos_d, right=False)  # negatives strictly closer than each positive
    ranks = closer.double() + torch.arange(1, width + 1, device=d.device, dtype=torch.float64)
    keep = torch.arange(width, device=d.device).unsqueeze(0) < num_pos.unsqueeze(1)
    ranks = torch.where(keep, ranks, torch.full_like(ranks, math.inf))
    return ranks.cpu().numpy(), num_pos.cpu().numpy().astype(np.int64)


def ranking_values(ranks: np.ndarray, num_pos: np.ndarray) -> dict[str, np.ndarray]:
    """Per item ``rank`` (of the true match), ``recall@1`` and ``map`` (its AP); NaN for items without a positive."""
    from rdml.eval.retrieval import per_query_from_ranks

    out = per_query_from_ranks(ranks, num_pos)
    rank = np.where(num_pos > 0, ranks[:, 0] if ranks.shape[1] else np.nan, np.nan)
    return {"rank": rank.astype(np.float64), "recall@1": out["recall@1"], "map": out["map"]}


def probe(emb: Tensor, db: Database, batch: Batch, moved: Tensor | None = None) -> dict[str, Tensor]:
    """The probe's per-item numbers (``wc.rank``, ``wc.recall@1``, ``wc.map``, ``wc.moved``) as CPU tensors."""
    values = ranking_values(*probe_ranks(emb, db, batch.self_index, batch.labels))
    out = {f"{PROBE}{k}": torch.from_numpy(v) for k, v in values.items()}
    n = len(batch.self_index)
    out[f"{PROBE}moved"] = (torch.ones(n, dtype=torch.float64) if moved is None
                            else moved.detach().cpu().to(torch.float64))
    return out


def moved_inputs(x_adv: Tensor, x0: Tensor) -> Tensor:
    """Per item, whether any pixel of the adversarial input differs from the clean one."""
    return (x_adv != x0).flatten(1).any(dim=1)


class ProbedAttack:
    """Mixin: the attack's own measurement plus the probe on the same adversarial embedding.

    Combined with each ranking attack class (``Probed<Class>`` below); the probed class has the same
    ``kind``, spec, seeds, targets and adversarial inputs as the plain one, so a probed attack's own
    numbers are the plain attack's, bit for bit.
    """

    def perturb(self, model: nn.Module, x0: Tensor, ctx: dict, generator: torch.Generator | None) -> Perturbed:
        out = super().perturb(model, x0, ctx, generator)  # type: ignore[misc]
        ctx["wc.moved"] = moved_inputs(out.x_adv, x0)
        return out

    def measure(self, adv: Tensor, ctx: dict) -> dict[str, Tensor]:
        values = super().measure(adv, ctx)  # type: ignore[misc]
        values.update(probe(adv, ctx["db"], ctx["batch"], ctx.get("wc.moved")))
        return values


PROBED: dict[str, type[RankingAttack]] = {}
for _kind, _cls in ATTACKS.items():
    _name = f"Probed{_cls.__name__}"
    PROBED[_kind] = type(_name, (ProbedAttack, _cls), {"__module__": __name__, "__qualname__": _name,
                                                        "__doc__": f"{_cls.__name__} with the worst-case probe."})
    globals()[_name] = PROBED[_kind]  # importable by name, so a probed attack pickles (e.g. to a Ray worker)


def with_probe(attack: RankingAttack) -> RankingAttack:
    """The probed version of a ranking attack object (same spec and key)."""
    if isinstance(attack, ProbedAttack):
        return attack
    return PROBED[attack.kind].from_spec(attack.spec, attack.key)  # type: ignore[return-value]


def split_probe(values: dict[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
    """Remove the probe's numbers of attack ``key`` from its measured ``values``; return them by probe metric."""
    tag = f"{key}:{PROBE}"
    out = {name[len(tag):]: values.pop(name) for name in list(values) if name.startswith(tag)}
    return out


# ---- the suite as an API object -----------------------------------------------------------------------


@dataclass
class WorstCaseOutcome:
    """What :class:`WorstCaseSuite` returns: the worst case per item, its means, every member's numbers, the flag.

    ``per_query[m]`` (m in ``recall@1``, ``map``, ``rank``) is the worst case over the whole suite (the
    clean item included); ``groups[g][m]`` the worst case over one part (``whitebox``, ``blackbox``,
    ``transfer``); ``members[key][m]`` one attack's numbers. ``flagged`` says a weaker attack beat the
    white-box one (``reasons`` in words). ``metrics`` is the flat ``worst.*`` dict an evaluation reports.
    """

    per_query: dict[str, np.ndarray]
    mean: dict[str, float]
    groups: dict[str, dict[str, np.ndarray]]
    members: dict[str, dict[str, np.ndarray]]
    flagged: bool
    reasons: list[str]
    metrics: dict[str, float]
    indices: np.ndarray
    skipped: dict[str, str] = field(default_factory=dict)
    result: Any = field(default=None, repr=False)  # the full RobustnessResult


class WorstCaseSuite:
    """The worst-case ranking suite, torchattacks style: built from a profile, called on a model and queries.

    ``WorstCaseSuite("worst28")`` is the shipped suite; keywords change it for a quick run: ``eps`` (every
    attack's radius; fixed steps scale with it), ``steps`` (the fixed-step attacks; their step grows so
    that steps x alpha stays the profile's), ``apgd_steps`` (the APGD attacks), ``blackbox_queries`` (0:
    no black-box search), ``transfer`` (spec strings of the attacks crafted on the surrogate; ``()``:
    none), ``max_queries``. Calling it::

        out = suite(model, queries, labels, gallery=..., gallery_labels=..., surrogate=other_model)
        out.mean["recall@1"], out.per_query["map"], out.flagged

    runs exactly what ``rdml evaluate --profile worst28`` runs
    (:func:`rdml.eval.robustness.evaluate_robustness`).
    """

    def __init__(self, profile: str | Path | AttackProfile = "worst28", *, eps: float | None = None,
                 steps: int | None = None, apgd_steps: int | None = None, blackbox_queries: int | None = None,
                 transfer: Sequence[str] | None = None, max_queries: int | None = None) -> None:
        prof = load_profile(profile)
        if prof.worst_case is None:
            raise ConfigError(f"profile {prof.name} has no worst_case section; use worst28, worst224 or a profile "
                              "with `worst_case:` (docs/methods.md#worst-case-suite)")
        self.profile = scaled_suite(prof, eps=eps, steps=steps, apgd_steps=apgd_steps,
                                    blackbox_queries=blackbox_queries, transfer=transfer, max_queries=max_queries)

    @property
    def version(self) -> int:
        return self.profile.worst_case.version  # type: ignore[union-attr]

    def build(self) -> list[RankingAttack]:
        """The white-box attack objects of the suite (probed)."""
        return [with_probe(a) for a in self.profile.build() if a.threat == "ranking"]

    def __call__(self, model: nn.Module, queries: Any, labels: Any = None, *, gallery: Any = None,
                 gallery_labels: Any = None, surrogate: nn.Module | None = None, batch_size: int = 128,
                 device: str | torch.device | None = None, seed: int = 0, normalize: bool | None = None,
                 progress: bool = False) -> WorstCaseOutcome:
        """Run the suite on ``model`` (queries and gallery as for an attack object); see :class:`WorstCaseOutcome`."""
        from rdml.attacks.inputs import as_dataset, model_device, prepare_model
        from rdml.eval.robustness import evaluate_robustness

        query_set = as_dataset(queries, labels, "queries")
        gallery_set = None if gallery is None else as_dataset(gallery, gallery_labels, "gallery")
        dev = torch.device(device) if device is not None else model_device(model)
        reference = gallery_set if gallery_set is not None else query_set
        model = prepare_model(model, reference, normalize, batch_size, dev)
        if surrogate is not None:
            surrogate = prepare_model(surrogate, reference, normalize, batch_size, dev)
        result = evaluate_robustness(model, query_set, self.profile, device=dev, seed=seed, batch_size=batch_size,
                                     progress=progress, gallery=gallery_set, surrogate=surrogate)
        return result.worst.outcome(result)

    def __repr__(self) -> str:
        return f"WorstCaseSuite({self.profile.name!r}, version={self.version}, attacks={len(self.profile.attacks)})"


def scaled_suite(prof: AttackProfile, *, eps: float | None = None, steps: int | None = None,
                 apgd_steps: int | None = None, blackbox_queries: int | None = None,
                 transfer: Sequence[str] | None = None, max_queries: int | None = None) -> AttackProfile:
    """A copy of a worst-case profile with its budgets changed (see :class:`WorstCaseSuite`)."""
    from rdml.attacks.profiles import parse_attack_spec

    worst = prof.worst_case
    assert worst is not None

    def rescale(spec: AttackSpec) -> AttackSpec:
        update: dict[str, Any] = {}
        if eps is not None and spec.eps > 0:
            update["eps"], update["alpha"] = eps, spec.alpha * eps / spec.eps
        if spec.step_rule == "apgd" and apgd_steps is not None:
            update["steps"] = apgd_steps
        elif spec.step_rule == "fixed" and steps is not None and spec.steps > 0:
            update["steps"] = steps
            update["alpha"] = update.get("alpha", spec.alpha) * spec.steps / steps
        return spec.model_copy(update=update) if update else spec

    specs = tuple(rescale(s) for s in prof.attacks)
    if transfer is None:
        moved = tuple(rescale(s) for s in worst.transfer)
    else:
        base = {"eps": eps if eps is not None else worst.blackbox.eps}
        moved = tuple(rescale(parse_attack_spec(t, base)) if isinstance(t, str) else t for t in transfer)
    blackbox: Mapping[str, Any] = {"queries": worst.blackbox.queries if blackbox_queries is None else blackbox_queries,
                                   "eps": worst.blackbox.eps if eps is None else eps}
    settings = worst.model_copy(update={"transfer": moved,
                                        "blackbox": worst.blackbox.model_copy(update=dict(blackbox))})
    name = prof.name if all(v is None for v in (eps, steps, apgd_steps, blackbox_queries, transfer)) \
        else f"{prof.name}-custom"
    return prof.model_copy(update={"attacks": specs, "worst_case": settings, "name": name,
                                   "max_queries": max_queries if max_queries is not None else prof.max_queries})


__all__ = ["PROBE", "PROBED", "PROBE_METRICS", "WORST_METRICS", "BlackBoxSettings", "ProbedAttack", "WorstCaseOutcome",
           "WorstCaseSuite", "moved_inputs", "probe", "probe_ranks", "ranking_values", "scaled_suite", "split_probe",
           "with_probe"]
