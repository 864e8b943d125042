"""Sanity checks around the attack suite: epsilon curves, a noise baseline, gradient-masking guard.

A defence that *masks* gradients instead of being robust shows up as PGD results that do not get
worse when the attacker gets more steps or a larger eps (eat-panum.md D.10, hm-robrank.md 9.5).
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

from rdml.attacks.profiles import AttackProfile, AttackSpec, parse_attack_spec
from rdml.eval.robustness import evaluate_robustness

HIGHER_IS_ROBUST = ("CA+", "QA+", "SPQA+", "ES:R", "LTM", "GTM", "GTT", "PANUM", "nmi", "ari", "cluster_acc",
                    "cluster_f1", "recall@1")
LOWER_IS_ROBUST = ("CA-", "QA-", "SPQA-", "TMA", "ES:D")


def _as_spec(attack: str | AttackSpec) -> AttackSpec:
    return parse_attack_spec(attack) if isinstance(attack, str) else attack


def default_metric(spec: AttackSpec) -> str:
    """The number a check watches: R@1 for ES and Panum, NMI for clustering attacks, else the attack's own."""
    if spec.kind == "ES":
        return "ES:R"
    if spec.threat == "clustering":
        return "nmi"
    return spec.metric_names()[0]


def higher_is_robust(metric: str) -> bool:
    base = metric.split(".")[-1]
    if base in LOWER_IS_ROBUST:
        return False
    return True


def attack_metric(model: nn.Module, dataset: Dataset, spec: AttackSpec, metric: str | None = None, **kwargs) -> float:
    """Run one attack and return one reported number (ranking: ``attacks.<m>``; clustering: ``<m>``)."""
    metric = metric or default_metric(spec)
    result = evaluate_robustness(model, dataset, AttackProfile(name="check", attacks=(spec,)), **kwargs)
    if spec.threat == "clustering":
        return float(result[f"clustering.{spec.base_name}.{metric}"])
    return float(result[f"attacks.{metric}"])


def robust_curve(model: nn.Module, dataset: Dataset, attack: str | AttackSpec, eps_values: Sequence[float],
                 metric: str | None = None, **kwargs) -> dict[float, float]:
    """The metric at every eps in ``eps_values`` (alpha scaled with eps; eps = 0 is the clean value)."""
    spec = _as_spec(attack)
    out = {}
    for eps in eps_values:
        alpha = spec.alpha * eps / spec.eps if spec.eps > 0 else spec.alpha
        out[float(eps)] = attack_metric(model, dataset, spec.model_copy(update={"eps": eps, "alpha": alpha}),
                                        metric, **kwargs)
    return out


def noise_baseline(model: nn.Module, dataset: Dataset, attack: str | AttackSpec, metric: str | None = None,
                   **kwargs) -> float:
    """The metric under uniform random noise in the same eps ball (a random start and no step)."""
    spec = _as_spec(attack)
    noisy = spec.model_copy(update={"alpha": 0.0, "steps": 1, "random_start": True, "restarts": 1})
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


def check_gradient_masking(model: nn.Module, dataset: Dataset, attack: str | AttackSpec, metric: str | None = None,
                           steps_factor: int = 4, eps_factor: float = 2.0, tolerance: float = 1.0,
                           floor: float = 0.0, **kwargs) -> MaskingCheck:
    """Run ``attack`` at its budget, with ``steps_factor`` x steps and with ``eps_factor`` x eps.

    Flags the model when more steps make the metric *better* for the defender by more than
    ``tolerance`` (in the metric's units), or when the larger eps does not make it worse by at least
    ``tolerance`` although the base result is not already at the attacker's best value (``floor``:
    0 for R@1-like metrics). Either sign is the classic symptom of masked gradients.
    """
    spec = _as_spec(attack)
    metric = metric or default_metric(spec)
    base = attack_metric(model, dataset, spec, metric, **kwargs)
    more = attack_metric(model, dataset, spec.model_copy(update={"steps": spec.steps * steps_factor}), metric, **kwargs)
    big = spec.model_copy(update={"eps": min(1.0, spec.eps * eps_factor), "alpha": spec.alpha * eps_factor})
    larger = attack_metric(model, dataset, big, metric, **kwargs)
    sign = 1.0 if higher_is_robust(metric) else -1.0
    reasons = []
    if sign * (more - base) > tolerance:
        reasons.append(f"{steps_factor}x steps made {metric} better for the defender ({base:.3g} -> {more:.3g})")
    if sign * (base - floor) > tolerance and sign * (base - larger) < tolerance:
        reasons.append(f"{eps_factor}x eps did not make {metric} worse ({base:.3g} -> {larger:.3g})")
    return MaskingCheck(metric, base, more, larger, bool(reasons), "; ".join(reasons) or "ok")
