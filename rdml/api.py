"""The one-call evaluation of any embedding model: :func:`evaluate` (re-exported as ``rdml.evaluate``).

``rdml.evaluate(model, queries, gallery=None, profile="rob28")`` takes any ``torch.nn.Module`` that
maps images in [0, 1] to embeddings ``[n, D]`` (rdml's own models, an EAT ensemble, a torchvision
backbone, a user's module) and returns a :class:`rdml.eval.compare.RunEvaluation`:

* ``metrics``: a flat dict in rdml's units (:mod:`rdml.metrics`): benign retrieval and clustering
  metrics (``recall@1`` ... ``nmi``), the profile's attacks (``attacks.<name>``), ERS (points),
  ``collapse``, ``embedding_spread``, ``esd_scale_gain`` / ``esd_driven`` and, with ``intervals``,
  ``ci.<key>.low`` / ``ci.<key>.high`` (bootstrap 95% over the queries); optionally an eps curve
  (``curve.<metric>.eps=<eps>``) and the gradient-masking check (``masking.*``);
* ``benign_per_query`` and ``attack_per_query``: the per-query values the intervals come from;
* ``flags``: warnings in words (collapse, suspected masking, an ERS driven by the ES:D term);
* ``info["card"]``: the evaluation's robustness card (:mod:`rdml.eval.cards`), written to ``card=PATH``.

A worst-case profile (``worst28``, ``worst224``; :mod:`rdml.attacks.worst_case`) adds ``worst.*``: per
query the worst rank / R@1 / AP over its attacks, with the black-box and (given a ``surrogate``)
transfer checks, whose flag joins ``masking.flag`` and the flags.

The protocol: without a gallery every query searches the whole query set with its own item excluded
(rdml's zero-shot protocol on a test set); with a gallery the queries search it and nothing is
excluded (In-Shop, or a user's own gallery). Given a data set's splits (``rdml.data.build_datasets``)
instead of tensors, the sets come from :func:`rdml.eval.protocol.evaluation_sets`, the choice that
training, ``rdml evaluate``, Tune and the ensemble make too (In-Shop: its queries against its gallery).
``rdml evaluate`` on the command line is a thin caller of this function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rdml.attacks.ers import esd_scale_gain, is_esd_driven
from rdml.attacks.inputs import L2Normalized, as_dataset, model_device, prepare_model
from rdml.attacks.profiles import AttackProfile, load_profile
from rdml.data import DatasetSplits
from rdml.errors import ConfigError
from rdml.eval.compare import RunEvaluation, evaluate_run
from rdml.eval.protocol import evaluation_sets

CURVE_FACTORS = (0.0, 0.25, 0.5, 1.0, 2.0)
"""eps multiples of the robust curve (``curve=True``)."""


def evaluate(model: nn.Module, queries: Any, gallery: Any = None, profile: str | Path | AttackProfile | None = None,
             *, labels: Any = None, gallery_labels: Any = None, device: str | torch.device | None = None,
             batch_size: int = 128, seed: int = 0, kmeans_seed: int = 0, max_queries: int | None = None,
             intervals: int = 1000, nmi_intervals: int = 200, normalize: bool | None = None, curve: bool = False,
             masking_check: bool = False, keep_examples: int = 0, progress: bool = False, name: str = "model",
             run_seed: int | None = None, surrogate: nn.Module | None = None, card: str | Path | None = None,
             model_info: dict[str, Any] | None = None, executor: Any = None) -> RunEvaluation:
    """Benign metrics, the profile's attacks, ERS, intervals and flags of ``model``, in one call.

    ``queries`` / ``gallery``: image tensors ``[n, C, H, W]`` in [0, 1] with ``labels`` /
    ``gallery_labels``, ``(images, labels)`` pairs, or datasets yielding ``(image, label, ...)``; or
    ``queries`` a :class:`rdml.data.DatasetSplits` (no ``gallery``): evaluated under rdml's protocol.
    ``profile``: a shipped profile name (``rob28``, ``rob224``, ``quick``, ``clustering``...), a YAML
    file or an :class:`AttackProfile`; None for benign metrics only. ``seed`` seeds the attack targets,
    ``kmeans_seed`` the clustering, ``max_queries`` attacks a seeded subset. ``intervals``: bootstrap
    resamples (0: none); ``nmi_intervals``: re-clusterings for NMI's interval. ``normalize``: None
    L2-normalises the embeddings when the model does not (rdml measures on the unit sphere), True
    always, False never. ``curve``: the robust metric at eps x (0, 1/4, 1/2, 1, 2) of the profile's ES
    attack (else its first ranking attack); ``masking_check``: the gradient-masking guard on it.
    ``device`` defaults to the model's. ``surrogate``: an independently trained model a worst-case
    profile crafts its transfer attacks on (normalised like ``model``). ``card``: also write the
    robustness card there; ``model_info``: fields the card records about the model (checkpoint, defense...).
    ``executor``: where the attacks run: None in this process; ``RayAttackWorkers(workers=N)``
    (:mod:`rdml.distributed.attack_workers`, Ray connected) shards them over N actors with the same
    per-query numbers (:mod:`rdml.eval.shards`).
    """
    if isinstance(queries, DatasetSplits):
        if gallery is not None:
            raise ConfigError("pass a data set's splits alone (its protocol picks the queries and the gallery), "
                              "or queries and gallery as tensors or datasets")
        queries, gallery = evaluation_sets(queries)
    query_set = as_dataset(queries, labels, "queries")
    gallery_set = None if gallery is None else as_dataset(gallery, gallery_labels, "gallery")
    dev = torch.device(device) if device is not None else model_device(model)
    model = prepare_model(model, gallery_set if gallery_set is not None else query_set, normalize, batch_size, dev)
    prof = None if profile is None or profile == "" else load_profile(profile)
    if surrogate is not None:
        surrogate = prepare_model(surrogate, gallery_set if gallery_set is not None else query_set, normalize,
                                  batch_size, dev)
    run = evaluate_run(model, query_set, prof, name=name, seed=run_seed, attack_seed=seed, device=dev,
                       batch_size=batch_size, max_queries=max_queries, n_boot=intervals, nmi_boot=nmi_intervals,
                       progress=progress, keep_examples=keep_examples, kmeans_seed=kmeans_seed, gallery=gallery_set,
                       surrogate=surrogate, executor=executor)
    if prof is not None:
        _attacked(run, model, query_set, gallery_set, prof, curve, masking_check, device=dev, seed=seed,
                  max_queries=max_queries, batch_size=batch_size)
    from rdml.eval.cards import build_card, describe_data, write_card

    run.info["card"] = build_card(
        run.metrics, profile=prof, robustness=run.robustness, flags=run.flags,
        model={"name": name, "class_name": type(model.model if isinstance(model, L2Normalized) else model).__name__,
               **(model_info or {})},
        data=describe_data(query_set, gallery_set),
        seeds={"attack": seed, "kmeans": kmeans_seed, "train": run_seed, "bootstrap_resamples": intervals})
    if card is not None:
        write_card(run.info["card"], card)
    return run


def _attacked(run: RunEvaluation, model: nn.Module, query_set, gallery_set, prof: AttackProfile, curve: bool,
              masking_check: bool, *, device, seed: int, max_queries: int | None, batch_size: int) -> None:
    """The profile-dependent extras: the profile's name, the ES:D scale numbers, curve and checks, masking flags."""
    metrics = run.metrics
    metrics["profile"] = prof.name  # type: ignore[assignment]
    if "attacks.ES:D" in metrics and "embedding_spread" in metrics:
        gain = esd_scale_gain(metrics["attacks.ES:D"], metrics["embedding_spread"])
        metrics["esd_scale_gain"] = gain
        metrics["esd_driven"] = float(is_esd_driven(metrics["attacks.ES:D"], metrics["embedding_spread"]))
    if curve or masking_check:
        _checks(run, model, query_set, gallery_set, prof, curve, masking_check, device=device, seed=seed,
                max_queries=max_queries or prof.max_queries, batch_size=batch_size)
    worst = getattr(run.robustness, "worst", None)
    if worst is not None and worst.flagged:  # the worst-case suite's transfer/black-box check joins the masking flag
        reasons = [str(metrics["masking.reason"])] if metrics.get("masking.flag", 0.0) >= 1.0 else []
        metrics["masking.flag"] = 1.0
        metrics["masking.reason"] = "; ".join([*reasons, *worst.reasons])  # type: ignore[assignment]


def _checks(run: RunEvaluation, model: nn.Module, queries, gallery, prof: AttackProfile, curve: bool,
            masking_check: bool, **kwargs: Any) -> None:
    """The eps curve and the gradient-masking check on the profile's ES attack (else its first ranking attack)."""
    from rdml.eval.robust_checks import check_gradient_masking, robust_curve

    ranking = [a for a in prof.build() if a.threat == "ranking"]
    if not ranking:
        return
    attack = next((a for a in ranking if a.kind == "ES"), ranking[0])
    kwargs = dict(kwargs, progress=False, gallery=gallery)
    if curve:
        metric = "ES:R" if attack.kind == "ES" else attack.metric_names()[0]  # robust R@1 vs eps for the report
        eps = [attack.spec.eps * f for f in CURVE_FACTORS]
        for e, value in robust_curve(model, queries, attack.spec, eps, metric, **kwargs).items():
            run.metrics[f"curve.{metric}.eps={e:.5f}"] = value
    if masking_check:
        check = check_gradient_masking(model, queries, attack.spec, **kwargs)
        run.metrics.update(check.as_metrics())
        run.metrics["masking.reason"] = check.reason  # type: ignore[assignment]

