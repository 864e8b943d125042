"""The attack object: one class per attack, built from keyword arguments or from an :class:`AttackSpec`.

An attack object is the torchattacks-style face of an attack::

    atk = QA(pm="-", M=1, eps=8 / 255, alpha=2 / 255, steps=10)
    out = atk(model, queries, labels, gallery=gallery, gallery_labels=gallery_labels)
    out.adv, out.values["QA-"], out.mean["QA-"]

Its keyword arguments are exactly the fields of an :class:`rdml.attacks.profiles.AttackSpec` (the
budget ``eps``, ``alpha``, ``steps``, ``norm``, ``random_start``, ``restarts``, ``step_rule`` (``"fixed"``
or APGD's ``"apgd"``), the metric key ``label``,
and the attack's own options, listed in its ``options``), validated by the same pydantic model, so
``QA(pm="-", M=1)`` and the spec string ``'QA:pm=-:M=1'`` are the same attack with the same defaults
(rob28's budget: eps 77/255, alpha 3/255, 32 steps, L-inf, no random start, one restart). A budget
written with one step is FGSM (a single step of size eps; see :attr:`AttackSpec.budget`).

Profiles build lists of these objects (:meth:`rdml.attacks.profiles.AttackProfile.build`) and every
evaluation path (:func:`rdml.eval.robustness.evaluate_robustness`, ``rdml attack``, ``rdml evaluate``,
:func:`rdml.evaluate`) runs them through the same code, so there is one implementation of each attack.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ValidationError

from rdml.attacks.pgd import Budget
from rdml.attacks.profiles import AttackSpec
from rdml.errors import ConfigError
from rdml.metrics import MetricSpec

BUDGET_KEYS = ("eps", "alpha", "steps", "norm", "random_start", "restarts", "step_rule", "label")
"""Keyword arguments every attack takes (pixel units of [0,1] images)."""


class Attack:
    """Base of every attack object: holds the validated spec and its metric key.

    Subclasses set ``kind`` (the spec kind), ``options`` (their own keyword arguments besides the
    budget) and ``reports`` (the metrics they measure, with unit and direction, :mod:`rdml.metrics`).
    """

    kind: ClassVar[str] = ""
    threat: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    reports: ClassVar[dict[str, MetricSpec]] = {}

    spec: AttackSpec
    key: str

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(BUDGET_KEYS) - set(self.options))
        if unknown:
            raise ConfigError(
                f"{type(self).__name__} takes no argument {', '.join(unknown)}; its arguments are "
                f"{', '.join(self.options + BUDGET_KEYS)}"
            )
        try:
            spec = AttackSpec(kind=self.kind, **kwargs)
        except ValidationError as err:
            msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'attack'}: {e['msg']}" for e in err.errors())
            raise ConfigError(f"{type(self).__name__}({_kwargs(kwargs)}) is invalid: {msgs}") from None
        except ValueError as err:  # the spec's own cross-field checks (pm for CA/QA/SPQA)
            raise ConfigError(f"{type(self).__name__}({_kwargs(kwargs)}) is invalid: {err}") from None
        self.spec = spec
        self.key = spec.label or spec.base_name

    @classmethod
    def from_spec(cls, spec: AttackSpec, key: str | None = None) -> Attack:
        """The object of a parsed spec (``key``: the metric key a profile gives it; default label or short name)."""
        if spec.kind != cls.kind:
            raise ValueError(f"{cls.__name__} is attack {cls.kind}, the spec is {spec.kind}")
        obj = cls.__new__(cls)
        obj.spec = spec
        obj.key = key or spec.label or spec.base_name
        return obj

    def with_budget(self, **changes: Any) -> Attack:
        """A copy with some spec fields changed (``eps``, ``steps``...), e.g. for an eps curve."""
        return type(self).from_spec(self.spec.model_copy(update=changes), self.key)

    @property
    def budget(self) -> Budget:
        return self.spec.budget

    @property
    def name(self) -> str:
        """The short name (``QA-``, ``ES``, ``centroid_class``...)."""
        return self.spec.base_name

    @property
    def restarts(self) -> int:
        return self.spec.restarts

    def metric_names(self) -> tuple[str, ...]:
        return self.spec.metric_names()

    def __getattr__(self, item: str) -> Any:
        # spec fields read as attributes: atk.eps, atk.pm, atk.W ...
        if item != "spec" and "spec" in self.__dict__ and item in AttackSpec.model_fields:
            return getattr(self.__dict__["spec"], item)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {item!r}")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.spec == self.spec and other.key == self.key  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.spec, self.key))

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.spec.to_string()}')"


def _kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
