"""Evaluate a checkpoint: benign retrieval/clustering metrics and, with --profile, the attack suite and ERS.

Prints a table and (with --json) writes the flat metrics: recall@1/2/4/8, map, map@r, nmi, ari,
cluster_acc, cluster_f1 (fractions), attacks.<name> (percentiles and R@1 in %, TMA cosine, ES:D
distance), ers, clustering.<attack>.<metric>. Next to the JSON it writes the per-query results
(<stem>.per_query.parquet) and a few clean/adversarial examples (<stem>.examples.pt) for
`rdml report`. Optional: an eps curve (--curve) and the gradient-masking check (--masking-check).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from rdml.errors import ConfigError

BENIGN_KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "map", "map@r", "nmi", "ari", "cluster_acc", "cluster_f1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file (or run directory) written by `rdml train`")
    parser.add_argument("--profile", default=None,
                        help="attack profile: rob28, rob224, quick, pami28, pami224, eccv28, eccv224, clustering, "
                             "clustering28, panum, or a YAML file (default: the checkpoint config's eval.profile)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the metrics to this JSON file")
    parser.add_argument("--max-queries", type=int, default=None, help="attack at most N (seeded) test samples")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the config's train.device)")
    parser.add_argument("--batch-size", type=int, default=None, help="attack batch size (default data.eval_batch_size)")
    parser.add_argument("--seed", type=int, default=None, help="attack target seed (default eval.attack_seed)")
    parser.add_argument("--curve", action="store_true",
                        help="also measure the first ranking attack's robust metric at eps x {0, 1/4, 1/2, 1, 2}")
    parser.add_argument("--masking-check", action="store_true",
                        help="run the gradient-masking guard (4x steps and 2x eps) on the ES attack")
    parser.add_argument("--examples", type=int, default=6, help="clean/adversarial examples kept for the report")
    parser.add_argument("--track", action="store_true", help="log the metrics and files to MLflow (rdml.tracking)")
    parser.add_argument("--run-id", default=None, help="with --track: log into this existing run (e.g. the training run)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _print_table(metrics: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, float):
            shown = f"{100 * value:.2f}%" if key in BENIGN_KEYS or key.startswith("clustering.") else f"{value:.3f}"
            if key.startswith("attacks.") and key.split(".", 1)[1] not in ("TMA", "ES:D"):
                shown = f"{value:.1f}"
            if key == "ers":
                shown = f"{value:.1f}" + ("  (COLLAPSED: R@1 < 5%)" if metrics.get("collapse") else "")
            table.add_row(key, shown)
    Console().print(table)


def evaluate_checkpoint(checkpoint: str | Path, profile: str | None = None, *, device: str | None = None,
                        max_queries: int | None = None, batch_size: int | None = None, seed: int | None = None,
                        curve: bool = False, masking_check: bool = False, examples: int = 6,
                        progress: bool = True) -> tuple[dict[str, Any], Any, Any]:
    """(flat metrics, RobustnessResult or None, config) of a checkpoint; the library side of the command."""
    from rdml.data import build_datasets
    from rdml.eval import evaluate_model
    from rdml.train import load_model, resolve_device

    model, cfg = load_model(checkpoint, device="cpu")
    dev = resolve_device(cfg, device)
    model.to(dev)
    test = build_datasets(cfg.data).test
    bs = batch_size or cfg.data.eval_batch_size
    metrics: dict[str, Any] = dict(evaluate_model(model, test, batch_size=bs, device=dev, seed=cfg.eval.kmeans_seed))
    profile = profile or cfg.eval.profile
    result = None
    seed = cfg.eval.attack_seed if seed is None else seed
    max_queries = max_queries if max_queries is not None else cfg.eval.max_queries
    if profile:
        from rdml.attacks.profiles import load_profile
        from rdml.eval.robustness import evaluate_robustness

        prof = load_profile(profile)
        result = evaluate_robustness(model, test, prof, device=dev, seed=seed, max_queries=max_queries,
                                     batch_size=bs, progress=progress, keep_examples=examples)
        metrics.update(result)
        metrics["profile"] = prof.name
        ranking = [s for _, s in prof.keyed() if s.threat == "ranking"]
        kwargs = dict(device=dev, seed=seed, max_queries=max_queries or prof.max_queries, batch_size=bs,
                      progress=False)
        if curve and ranking:
            from rdml.eval.robust_checks import default_metric, robust_curve

            spec = next((s for s in ranking if s.kind == "ES"), ranking[0])
            metric = default_metric(spec)
            for eps, value in robust_curve(model, test, spec, [spec.eps * f for f in (0, 0.25, 0.5, 1, 2)],
                                           metric, **kwargs).items():
                metrics[f"curve.{metric}.eps={eps:.5f}"] = value
        if masking_check and ranking:
            from rdml.eval.robust_checks import check_gradient_masking

            spec = next((s for s in ranking if s.kind == "ES"), ranking[0])
            check = check_gradient_masking(model, test, spec, **kwargs)
            metrics.update(check.as_metrics())
            metrics["masking.reason"] = check.reason
    return metrics, result, cfg


def _track(args: argparse.Namespace, cfg: Any, metrics: dict[str, Any], files: list[Path]) -> None:
    """Log to MLflow through rdml.tracking (the only mlflow importer)."""
    from rdml import tracking

    run_id = args.run_id
    created = False
    if run_id is None:
        run_id = tracking.start_run(cfg, tags={"rdml.kind": "evaluate", "rdml.checkpoint": str(args.checkpoint)},
                                    run_name=f"evaluate-{cfg.name}")
        created = True
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
    tracking.log_metrics(run_id, numeric, tracking=cfg.tracking)
    for f in files:
        tracking.log_artifact(run_id, f, "evaluation", tracking=cfg.tracking)
    if created:
        tracking.end_run(run_id, tracking=cfg.tracking)
    print(f"logged to MLflow run {run_id}")


def run(args: argparse.Namespace) -> int:
    if args.max_queries is not None and args.max_queries <= 0:
        raise ConfigError("--max-queries must be a positive number of test samples")
    metrics, result, cfg = evaluate_checkpoint(
        args.checkpoint, args.profile, device=args.device, max_queries=args.max_queries, batch_size=args.batch_size,
        seed=args.seed, curve=args.curve, masking_check=args.masking_check, examples=args.examples,
        progress=not args.quiet,
    )
    _print_table(metrics, f"rdml evaluate {args.checkpoint}")
    files: list[Path] = []
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2, sort_keys=True))
        files.append(out)
        if result is not None and result.outcomes:
            files.append(result.write_parquet(out.with_suffix(".per_query.parquet")))
        if result is not None and result.examples is not None:
            import torch

            ex = out.with_suffix(".examples.pt")
            torch.save(result.examples, ex)
            files.append(ex)
        print(f"wrote {', '.join(str(f) for f in files)}")
    if args.track:
        _track(args, cfg, metrics, files)
    return 0
