"""rdml: adversarially robust deep metric learning (defenses, EAT ensembles on Ray, attacks, MLflow).

The public library API (shown with runnable examples in ``docs/api.md``), importable from ``rdml``:

* ``rdml.evaluate(model, queries, gallery=None, profile=...)``: benign metrics, the profile's attacks,
  ERS, intervals and flags of any embedding model in one call (:mod:`rdml.api`);
* attack objects, torchattacks style: ``rdml.QA(pm="-", M=1, eps=8/255)(model, queries, labels,
  gallery=..., gallery_labels=...)``; ``CA``, ``QA``, ``SPQA``, ``TMA``, ``ES``, ``LTM``, ``GTM``,
  ``GTT``, ``PANUM``, ``CentroidAttack``, ``ClusterShiftAttack``; ``load_profile(name).build()``
  gives a profile's list of them (:mod:`rdml.attacks`);
* defenses and losses built with keyword arguments: ``HardnessManipulation``,
  ``EmbeddingShiftedTriplet``, ``AntiCollapseTriplet``, ``PanumRobust``, ``CollapseAwareTripletDecoupling``,
  ``NoDefense``, ``StepState``; ``TripletLoss``, ``ContrastiveLoss``, ``ProxyAnchorLoss``;
* ``retrieval_metrics``, ``clustering_metrics``, the metric registry ``lookup``, and pytorch-metric-learning's
  ``knn_func`` / ``AccuracyCalculator`` with rdml's metrics (:mod:`rdml.eval.pml`).

The names are imported on first use, so ``import rdml`` (and the CLI) stays cheap.

``rdml.__version__`` is the installed distribution's version (``importlib.metadata``, so it follows
``pyproject.toml`` without a second copy); a source tree that is not installed reports ``0+unknown``.
"""

from __future__ import annotations

from rdml import _torchvision_compat  # noqa: F401 -- first: lets `import torchvision` work after `import rdml`


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rdml")
    except PackageNotFoundError:  # running from a checkout that was never pip-installed
        return "0+unknown"


__version__ = _version()

_EXPORTS = {
    "evaluate": "rdml.api",
    **dict.fromkeys(("Attack", "AttackOutcome", "AttackProfile", "AttackSpec", "CA", "CentroidAttack",
                     "ClusterShiftAttack", "ClusteringOutcome", "ES", "GTM", "GTT", "L2Normalized", "LTM", "PANUM",
                     "QA", "SPQA", "TMA", "build_attack", "load_profile", "parse_attack_spec", "profile_names"),
                    "rdml.attacks"),
    **dict.fromkeys(("AntiCollapseTriplet", "CollapseAwareTripletDecoupling", "Defense", "EmbeddingShiftedTriplet",
                     "HardnessManipulation", "NoDefense", "PanumRobust", "StepState", "build_defense"), "rdml.defenses"),
    **dict.fromkeys(("ContrastiveLoss", "ProxyAnchorLoss", "TripletLoss", "build_loss"), "rdml.losses"),
    **dict.fromkeys(("clustering_metrics", "retrieval_metrics"), "rdml.eval"),
    **dict.fromkeys(("AccuracyCalculator", "knn_func"), "rdml.eval.pml"),
    "RunEvaluation": "rdml.eval.compare",
    "lookup": "rdml.metrics",
}


def __getattr__(name: str):
    """Import a public name from its module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rdml' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = ["__version__", *sorted(_EXPORTS)]
