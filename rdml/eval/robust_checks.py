"""Sanity checks around the attack suite: epsilon curves, a noise baseline, gradient-masking guard.

A defence that *masks* gradients instead of being robust shows up as PGD results that do not get
worse when the attacker gets more steps or a larger eps (docs/methods.md#robustness-checks).
:func:`check_gradient_masking` runs one attack at its budget, with 4x the steps, and at 2x eps, and
flags the model when the stronger attacks are not at least as damaging. :func:`robust_curve` gives
the metric over a grid of eps (the report's robust-R@1-vs-eps plot) and :func:`noise_baseline` the
same metric under uniform random noise of the same eps (PGD must hurt far more).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from torch.utils.data import Dataset

from rdml.attacks.base import Attack
from rdml.attacks.profiles import AttackProfile, AttackSpec, parse_attack_spec
from rdml.eval.robustness import evaluate_robustness


def _as_spec(attack: str | AttackSpec | Attack) -> AttackSpec:
    """A spec string, a spec or an attack object (:mod:`rdml.attacks.base`) as its spec."""
    if isinstance(attack, Attack):
        return attack.spec
    return parse_attack_spec(attack) if isinstance(attack, str) else attack


def default_metric(spec: AttackSpec) -> str:
    """The number a check watches: what the attack optimises (ES:D for ES, which maximises the shift and
    need not lower R@1 step by step), NMI for clustering attacks, else the attack's own number."""
    if spec.threat == "clustering":
        return "nmi"
    return spec.metric_names()[0]


def attack_metric(model: nn.Module, dataset: Dataset, spec: AttackSpec | Attack, metric: str | None = None,
                  **kwargs) -> float:
    """Run one attack and return one reported number (ranking: ``attacks.<m>``; clustering: ``<m>``).

    ``kwargs`` go to :func:`rdml.eval.robustness.evaluate_robustness` (``gallery=`` for queries outside it).
    """
    spec = _as_spec(spec)
    metric = metric or default_metric(spec)
    result = evaluate_robustness(model, dataset, AttackProfile(name="check", attacks=(spec,)), **kwargs)
    if spec.threat == "clustering":
        return float(result[f"clustering.{spec.base_name}.{metric}"])
    return float(result[f"attacks.{metric}"])


def robust_curve(model: nn.Module, dataset: Dataset, attack: str | AttackSpec | Attack, eps_values: Sequence[float],
                 metric: str | None = None, **kwargs) -> dict[float, float]:
    """The metric at every eps in ``eps_values`` (alpha scaled with eps; eps = 0 is the clean value)."""
    spec = _as_spec(attack)
    out = {}
    for eps in eps_values:
        alpha = spec.alpha * eps / spec.eps if spec.eps > 0 else spec.alpha
        out[float(eps)] = attack_metric(model, dataset, spec.model_copy(update={"eps": eps, "alpha": alpha}),
                                        metric, **kwargs)
    return out


def noise_baseline(model: nn.Module, dataset: Dataset, attack: str | AttackSpec | Attack, metric: str | None = None,
                   **kwargs) -> float:
    """The metric under uniform random noise in the same eps ball (a random start and no step)."""
    spec = _as_spec(attack)
    noisy = spec.model_copy(update={"steps": 0, "random_start": True, "restarts": 1})
    return attack_metric(model, dataset, noisy, metric, **kwargs)


@dataclass
class MaskingCheck:
    """Outcome of :func:`check_gradient_masking`."""

    metric: str
    base: float
    more_steps: float
    larger_eps: float
    flagged: bool
    reason: str

    def as_metrics(self, prefix: str = "masking") -> dict[str, float]:
        return {f"{prefix}.{self.metric}.base": self.base, f"{prefix}.{self.metric}.more_steps": self.more_steps,
                f"{prefix}.{self.metric}.larger_eps": self.larger_eps, f"{prefix}.flag": float(self.flagged)}


def check_gradient_masking(model: nn.Module, dataset: Dataset, attack: str | AttackSpec | Attack, metric: str | None = None,
                           steps_factor: int = 4, eps_factor: float = 2.0, tolerance: float | None = None,
                           floor: float | None = None, **kwargs) -> MaskingCheck:
    """Run ``attack`` at its budget, with ``steps_factor`` x steps and with ``eps_factor`` x eps.

    Flags the model when more steps make the metric *better* for the defender by more than
    ``tolerance``, or when the larger eps does not make it worse by at least ``tolerance`` although the
    base result is not already at the attacker's best value (``floor``). Either sign is the classic
    symptom of masked gradients. The direction, the attacker's best value and the tolerance come from
    the metric registry (:mod:`rdml.metrics`), in the metric's own unit (a fraction, a cosine, a
    distance), unless given.
    """
    from rdml.metrics import lookup

    spec = _as_spec(attack)
    metric = metric or default_metric(spec)
    info = lookup(f"attacks.{metric}" if spec.threat == "ranking" else f"clustering.{spec.base_name}.{metric}")
    tolerance = info.tolerance if tolerance is None else tolerance
    floor = info.worst if floor is None else floor
    base = attack_metric(model, dataset, spec, metric, **kwargs)
    more = attack_metric(model, dataset, spec.model_copy(update={"steps": spec.steps * steps_factor}), metric, **kwargs)
    big = spec.model_copy(update={"eps": min(1.0, spec.eps * eps_factor), "alpha": spec.alpha * eps_factor})
    larger = attack_metric(model, dataset, big, metric, **kwargs)
    reasons = []
    if info.better(more, base) > tolerance:
        reasons.append(f"{steps_factor}x steps made {metric} better for the defender ({base:.3g} -> {more:.3g})")
    at_floor = floor is not None and info.better(base, floor) <= tolerance
    if not at_floor and info.better(base, larger) < tolerance:
        reasons.append(f"{eps_factor}x eps did not make {metric} worse ({base:.3g} -> {larger:.3g})")
    return MaskingCheck(metric, base, more, larger, bool(reasons), "; ".join(reasons) or "ok")
