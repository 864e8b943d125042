"""``cross_member`` (reading B of the spec): every member also trains on the other members' adversarial examples.

* **What a member publishes**: the examples its own adversary crafted in its last step (white-box on
  its own model, any defense), as a :class:`~rdml.ensemble.stats.RobustnessStats` record: the sample
  ids and labels of the images the crafted rows perturb, the perturbation (int8, in units of eps/127)
  and per-row robustness statistics (batch-hard hinge, hardness, embedding shift). The hook watches
  the defense's inner maximisation (:class:`~rdml.defenses.base.Craft`) without changing it.
* **What it does with the others' records**: rebuilds their adversarial examples (the clean image
  reloaded by sample id, plus the de-quantised perturbation, clipped to [0, 1]) and trains on them as
  extra examples (``StepState.extra``): ``(1 - w) L_defense + w L(f(x_transferred))`` with the
  defense's metric loss, ``w = ensemble.transfer_weight`` (0.5). One more pass per step.
* **Which ones**: class groups of the member's batch layout (SPC-2 pairs, or ``m_per_class`` blocks)
  are kept intact, so any metric loss applies; as many groups as the member's batch holds are drawn
  without replacement with probability softmax(group mean adversarial loss / ``ensemble.transfer_temperature``):
  the ensemble's per-sample statistics decide what the member trains on.

The examples a member receives at step ``s`` were crafted by the others at step ``s - 1``, against their
weights of that step: the exchange happens between steps, so no member waits for another inside one
(:mod:`rdml.ensemble.exchange`). A member's last record is part of its checkpoint, so a restore
replays exactly. With a dataset that augments, the reloaded view differs from the attacked one; the
perturbation is still a valid eps-bounded one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from rdml.attacks.pgd import PGDResult
from rdml.defenses.base import Craft, ExtraExamples, StepState, run_adversary
from rdml.ensemble.objectives import per_sample_stats
from rdml.ensemble.stats import (
    _HEADER_BYTES,
    _PER_SAMPLE_BYTES,
    RobustnessStats,
    concat_stats,
    make_stats,
    quantise_perturbation,
    stats_from_state,
    stats_to_state,
)
from rdml.ensemble.transfer.base import Geometry, SelfTransfer, register


@register
class CrossMember(SelfTransfer):
    name = "cross_member"
    summary: ClassVar[str] = "train also on the other members' adversarial examples, chosen by their losses"

    def __init__(self, member: Any) -> None:
        super().__init__(member)
        self.outbox: RobustnessStats | None = None  # published before the next step
        self._crafted: list[RobustnessStats] = []
        self._batch: tuple[Tensor, Tensor, Tensor] | None = None
        self._step = -1

    def publish(self) -> RobustnessStats | None:
        return self.outbox

    def hooks(self, others: Sequence[Any], state: StepState, batch: tuple[Tensor, Tensor, Tensor]) -> None:
        self._batch, self._step, self._crafted = batch, state.step, []
        for rec in others:
            rec.check()
            if rec.step != state.step - 1:
                raise RuntimeError(f"member {self.member.id} at step {state.step} got member {rec.member}'s examples "
                                   f"of step {rec.step} (expected {state.step - 1}): the exchange is out of order")
        if others:
            chosen = self.transferred(others, len(batch[1]), state.generator)
            if chosen is not None:
                state.extra = ExtraExamples(*chosen, weight=self.member.cfg.ensemble.transfer_weight)
        state.adversary = self._watch

    def _watch(self, craft: Craft) -> PGDResult:
        """Run the defense's own adversary unchanged; keep what it crafted for the next publish."""
        res = run_adversary(None, craft)
        x, y, ids = self._batch
        rows = craft.index.to(y.device)
        model = self.member.model
        with torch.no_grad():  # the defense holds the model frozen in eval mode here
            emb_adv, emb_clean = model(res.x_adv), model(craft.x0)
        stats = per_sample_stats(emb_adv, emb_clean, y[rows], self.member.cfg.loss.margin)
        self._crafted.append(make_stats(
            self.member.id, self._step, ids[rows.cpu()], y[rows], stats["adv_loss"], stats["hardness"],
            stats["shift"], res.iterations, perturbation=quantise_perturbation(res.x_adv - craft.x0, craft.budget.eps),
        ))
        return res

    def finish(self) -> None:
        self.outbox = concat_stats(self._crafted)
        self._crafted, self._batch = [], None

    # ------------------------------------------------------------------ choosing transferred examples
    def _group_size(self) -> int:
        data = self.member.cfg.data
        return 2 if data.batch_sampler == "pairs" else int(data.m_per_class)

    def transferred(self, others: Sequence[RobustnessStats], size: int,
                    generator: torch.Generator | None) -> tuple[Tensor, Tensor] | None:
        """Up to ``size`` transferred examples in class groups drawn by softmax(group loss / temperature)."""
        g = self._group_size()
        images, labels, scores = [], [], []
        train_set = self.member.train_set
        for rec in others:
            delta = rec.delta()
            clean = torch.stack([train_set[int(i)][0] for i in rec.sample_ids])
            x_hat = (clean + delta).clamp(0.0, 1.0)
            lab = torch.from_numpy(np.array(rec.labels))
            loss = torch.from_numpy(rec.adv_loss.astype(np.float32))
            for c in torch.unique(lab).tolist():
                rows = (lab == c).nonzero().flatten()
                for start in range(0, len(rows) - g + 1, g):
                    sel = rows[start : start + g]
                    images.append(x_hat[sel])
                    labels.append(lab[sel])
                    scores.append(loss[sel].mean())
        k = min(size // g, len(scores))
        if k == 0:
            return None
        probs = torch.softmax(torch.stack(scores) / self.member.cfg.ensemble.transfer_temperature, dim=0)
        chosen = torch.multinomial(probs, k, replacement=False, generator=generator).tolist()
        device = self.member.device
        return (torch.cat([images[i] for i in chosen]).to(device), torch.cat([labels[i] for i in chosen]).to(device))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"outbox": stats_to_state(self.outbox)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outbox = stats_from_state(state.get("outbox") or {})

    @classmethod
    def bytes_per_step(cls, geometry: Geometry) -> dict[str, int]:
        """One crafted row per batch image (minmax; HM crafts 3 rows per triplet): scalars + int8 perturbation."""
        pixels = geometry.channels * geometry.image_size * geometry.image_size
        published = _HEADER_BYTES + geometry.batch * (_PER_SAMPLE_BYTES + pixels)
        return {"published": published, "received": (geometry.members - 1) * published}
