"""``none``: independent adversarial training of every member (the ablation: no self-transfer).

A member publishes nothing and never reads another member's record (``Member.stats_reads`` stays 0,
tested). The ensemble's members still differ by their data subsets and seeds.
"""

from __future__ import annotations

from typing import ClassVar

from rdml.config import ExperimentConfig
from rdml.ensemble.transfer.base import SelfTransfer, register


@register
class NoTransfer(SelfTransfer):
    name = "none"
    summary: ClassVar[str] = "independent members (ablation): nothing is exchanged"

    @classmethod
    def requirements(cls, cfg: ExperimentConfig) -> list[str]:
        return []
