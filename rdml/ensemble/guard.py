"""The gradient-masking guard of an ensemble: crafted on the combination beats transferred from any member.

An ensemble can look robust only because its combined gradient is uninformative (gradient masking).
Then examples crafted on one member and transferred would damage the combined embedding *more* than
the white-box attack on the combination itself (docs/eat.md, check D.10). :func:`transfer_guard` checks this on a
whole evaluation set, in the clustering threat model (every sample perturbed):

* for each source (the combined ensemble, then every member) the set is perturbed by PGD maximising
  the source's embedding shift from its own clean embedding (the ES attack of rob28, same offset);
* the damage is measured on the *combined* embedding g: the mean shift ``||g(x_adv) - g(x)||`` (one
  value per sample, with a bootstrap interval), and the NMI and R@1 of g on the perturbed set (k-means
  with as many clusters as classes, as the clustering attacks report it);
* the guard holds when the ensemble-crafted set is at least as damaging as every transferred one on
  the shift (within the intervals' tolerance: its interval's upper end is not below the best transferred
  value) and on NMI (not higher than the lowest transferred NMI, to 0.005).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rdml.attacks.pgd import Budget, frozen_eval, pgd
from rdml.attacks.ranking import shift_distance

NMI_TOLERANCE = 0.005


def lowers_nmi_as_far(nmi: float, lowest_transferred: float) -> bool:
    """The guard's NMI rule: an attack on the combined model leaves its NMI no higher than the lowest NMI
    any transferred attack leaves, to ``NMI_TOLERANCE``. One rule for the guard and for the reports."""
    return bool(nmi <= lowest_transferred + NMI_TOLERANCE)


def _perturb(source: nn.Module, x: torch.Tensor, budget: Budget) -> torch.Tensor:
    with frozen_eval(source):
        with torch.no_grad():
            reference = source(x)
        return pgd(lambda z: -shift_distance(source(z), reference), x, budget).x_adv


def transfer_guard(model: Any, dataset: Dataset, *, eps: float = 77 / 255, alpha: float = 3 / 255, steps: int = 32,
                   batch_size: int = 256, seed: int = 0, n_boot: int = 1000, device: str | torch.device = "cpu",
                   max_items: int | None = None) -> dict[str, Any]:
    """Damage to the combined embedding of ``model`` (an :class:`~rdml.ensemble.combine.EnsembleModel`) by the
    ES attack crafted on it and on each member; ``holds`` says whether the guard holds (module doc)."""
    from rdml.eval.intervals import bootstrap
    from rdml.eval.metrics import benign_metrics

    device = torch.device(device)
    model = model.to(device).eval()
    budget = Budget(eps, alpha, steps)
    sources = {"ensemble": model, **{f"member_{k}": m for k, m in enumerate(model.members)}}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    shifts: dict[str, list[np.ndarray]] = {name: [] for name in sources}
    adv_emb: dict[str, list[np.ndarray]] = {name: [] for name in sources}
    labels, seen = [], 0
    for x, y, _ in loader:
        if max_items is not None and seen >= max_items:
            break
        if max_items is not None:
            x, y = x[: max_items - seen], y[: max_items - seen]
        seen += len(y)
        x = x.to(device)
        labels.append(np.asarray(y))
        with torch.no_grad():
            clean = model(x)
        for name, source in sources.items():
            x_adv = _perturb(source, x, budget)
            with torch.no_grad():
                emb = model(x_adv)
            shifts[name].append((emb - clean).norm(dim=1).cpu().numpy())
            adv_emb[name].append(emb.cpu().numpy())
    y_all = np.concatenate(labels)
    out: dict[str, Any] = {"eps": eps, "alpha": alpha, "steps": steps, "items": int(len(y_all)), "sources": {}}
    for name in sources:
        per_item = np.concatenate(shifts[name])
        iv = bootstrap({"shift": per_item}, n_boot=n_boot, seed=seed)["shift"] if n_boot else None
        metrics = benign_metrics(np.concatenate(adv_emb[name]), y_all, seed=seed)
        out["sources"][name] = {
            "shift": float(per_item.mean()),
            "shift_low": float(iv.low) if iv else float("nan"),
            "shift_high": float(iv.high) if iv else float("nan"),
            "nmi": float(metrics["nmi"]),
            "recall@1": float(metrics["recall@1"]),
        }
    own = out["sources"]["ensemble"]
    transferred = [v for k, v in out["sources"].items() if k != "ensemble"]
    best_shift = max(v["shift"] for v in transferred)
    lowest_nmi = min(v["nmi"] for v in transferred)
    upper = own["shift_high"] if np.isfinite(own["shift_high"]) else own["shift"]
    out["holds_shift"] = bool(upper >= best_shift)
    out["holds_nmi"] = lowers_nmi_as_far(own["nmi"], lowest_nmi)
    out["holds"] = out["holds_shift"] and out["holds_nmi"]
    return out
