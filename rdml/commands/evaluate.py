"""Evaluate models: benign retrieval/clustering metrics and, with --profile, the attack suite and ERS,
every number with a bootstrap 95% interval over the test queries.

A model is a training checkpoint (or its run directory), an EAT ensemble run directory (or its
manifest.json: the combined embedding of all members), or one member file of an ensemble run
(step-*/member-k.pt: that member alone); see rdml.ensemble.load. A model rdml did not train comes in
with --model package.module:factory [--weights FILE] or --model FILE.ts (TorchScript), its data set
named by --data NAME or --config (rdml.user_model). Several models (e.g. the seeds of one recipe,
`rdml train --seeds N`) are evaluated together: each gets its table, then their mean over runs with a
two-level bootstrap interval (seeds, then queries; rdml.eval.compare).

The command is a thin caller of the library's one-call evaluation, :func:`rdml.evaluate`.

Units (rdml.metrics): results are stored as fractions (R@k, mAP, NMI, rank percentiles, attack R@1),
cosines (TMA) and distances (ES:D); ERS in points; the table shows fractions in percent. With --json
the flat metrics (with ``ci.<key>.low/high``) are written; next to the JSON the per-query results
(<stem>.per_query.parquet) and a few clean/adversarial examples (<stem>.examples.pt) for
`rdml report`. Optional: an eps curve (--curve) and the gradient-masking check (--masking-check).

Every evaluation writes a robustness card (rdml.eval.cards: model, data, threat model, suite and its
version, queries, seeds, benign metrics, every attack, ERS, worst case, intervals, flags, MLflow run
id): <stem>.card.json beside --json, or --card PATH, else ./rdml-cards/<model>.<profile>.card.json;
with --track it is also logged as the run's artifact cards/<file>, which `rdml leaderboard` collects.
The worst-case profiles (worst28, worst224) craft their transfer attacks on --surrogate.

--workers N shards the attacks over N Ray actors (rdml.eval.shards; one GPU each where the cluster has
GPUs), the gallery embedded once and sent through the object store; every per-query number is the
one-process number, bit for bit (same device kind and threads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rdml.commands.options import at_least
from rdml.errors import ConfigError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model / --weights / --data / --config: a model rdml did not train, and its data set."""
    parser.add_argument("--model", default=None, metavar="SPEC",
                        help="a model rdml did not train: package.module:factory (a function or class returning an "
                             "nn.Module that maps [0,1] images to embeddings) or a TorchScript file")
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="with --model: a state dict to load (read with torch.load(weights_only=True))")
    parser.add_argument("--data", default=None, metavar="NAME",
                        help="with --model: the data set to evaluate on (digits, mnist5k, cub, cars, sop, inshop...)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="with --model: a config file or recipe giving the data set and eval settings")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="*",
                        help="checkpoint file or run directory of `rdml train`; run directory (or manifest.json) of "
                             "`rdml ensemble`, or one of its step-*/member-k.pt; several: evaluated together")
    add_model_arguments(parser)
    parser.add_argument("--profile", default=None,
                        help="attack profile: rob28, rob28-adaptive, worst28, rob224, worst224, quick, pami28, pami224, "
                             "eccv28, eccv224, clustering, clustering28, panum, or a YAML file (default: the checkpoint "
                             "config's eval.profile)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the metrics to this JSON file")
    parser.add_argument("--max-queries", type=at_least(1, "test samples"), default=None, help="attack at most N (seeded) test samples")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the config's train.device)")
    parser.add_argument("--batch-size", type=at_least(1, "images per batch"), default=None, help="attack batch size (default data.eval_batch_size)")
    parser.add_argument("--seed", type=at_least(0), default=None, help="attack target seed (default eval.attack_seed)")
    parser.add_argument("--curve", action="store_true",
                        help="also measure the first ranking attack's robust metric at eps x {0, 1/4, 1/2, 1, 2}")
    parser.add_argument("--masking-check", action="store_true",
                        help="run the gradient-masking guard (4x steps and 2x eps) on the ES attack")
    parser.add_argument("--examples", type=at_least(0), default=6, help="clean/adversarial examples kept for the report")
    parser.add_argument("--track", action="store_true", help="log the metrics and files to MLflow (rdml.tracking)")
    parser.add_argument("--run-id", default=None, help="with --track: log into this existing run (e.g. the training run)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--intervals", type=at_least(0, "bootstrap resamples"), default=1000, metavar="N",
                        help="bootstrap resamples for the 95%% intervals (default 1000; 0: none)")
    parser.add_argument("--surrogate", default=None, metavar="PATH",
                        help="worst-case profiles: an independently trained model (checkpoint or run directory, "
                             "or a TorchScript file) the transfer attacks are crafted on")
    parser.add_argument("--workers", type=at_least(0, "attack workers"), default=0, metavar="N",
                        help="shard the attacks over N Ray actors (one GPU each where the cluster has GPUs), same "
                             "numbers as in one process (default 0: in this process)")
    parser.add_argument("--threads", type=at_least(1, "torch threads"), default=1, metavar="T",
                        help="with --workers: torch threads (and Ray CPUs) per worker (default 1)")
    parser.add_argument("--address", default=None,
                        help="with --workers: the Ray cluster to join (default RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--card", default=None, metavar="PATH",
                        help="write the robustness card here (default: <json stem>.card.json beside --json, else "
                             "rdml-cards/<model>.<profile>.card.json)")


def _print_table(rows: dict[str, dict[str, Any]], title: str) -> None:
    """One column per model (and the combined one), each number with its interval, units from rdml.metrics."""
    from rich.console import Console
    from rich.table import Table

    from rdml.metrics import show_interval

    table = Table(title=title + "  (fractions in %; intervals: bootstrap 95%)")
    table.add_column("metric")
    for name in rows:
        table.add_column(name, justify="right")
    keys: list[str] = []
    for metrics in rows.values():
        keys += [k for k, v in metrics.items() if k not in keys and not k.startswith("ci.") and isinstance(v, float)]
    for key in keys:
        cells = [show_interval(m, key) if key in m else "—" for m in rows.values()]
        if key == "ers" and any(m.get("collapse") for m in rows.values()):
            cells = [c + ("  (COLLAPSED)" if m.get("collapse") else "") for c, m in zip(cells, rows.values(), strict=True)]
        table.add_row(key, *cells)
    Console(width=max(100, 30 + 26 * len(rows))).print(table)


def user_model_source(model: str, weights: str | None, data: str | None, config: str | None) -> Any:
    """(model, config, description) of ``--model`` with its data set from ``--data`` or ``--config``."""
    from rdml.config import build_config, load_config
    from rdml.ensemble.load import LoadedModel
    from rdml.user_model import load_user_model

    if data is None and config is None:
        raise ConfigError("--model needs the data set to evaluate on: add --data NAME (e.g. --data digits) or "
                          "--config FILE")
    cfg = load_config(config) if config is not None else build_config({})
    if data is not None:
        cfg = build_config({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "name": data}})
    net, description = load_user_model(model, weights, device="cpu")
    return LoadedModel(net, cfg, description)


def _load(checkpoint: str | Path | None, source: Any) -> Any:
    if source is not None:
        return source
    from rdml.ensemble.load import load_any_model

    return load_any_model(checkpoint, device="cpu")  # type: ignore[arg-type]


def load_surrogate(path: str | None) -> Any:
    """The transfer attacks' source model of ``--surrogate``: an rdml checkpoint/run/ensemble path or TorchScript."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--surrogate {path}: no such file or directory; pass a checkpoint or run directory of "
                          "an independently trained model (e.g. another seed, or vanilla)")
    if p.is_file() and p.suffix not in (".pt", ".json"):
        from rdml.user_model import load_user_model

        return load_user_model(str(p), None, device="cpu")[0]
    return _load(p, None).model


def _model_info(checkpoint: str | Path | None, loaded: Any, cfg: Any) -> dict[str, Any]:
    """What the card records about a model: the path, and the config that built it."""
    return {"description": loaded.description, "checkpoint": None if checkpoint is None else str(checkpoint),
            "config_name": cfg.name, "defense": cfg.defense.name, "arch": cfg.model.arch,
            "embedding_dim": cfg.model.embedding_dim}


def evaluate_checkpoint(checkpoint: str | Path | None, profile: str | None = None, *, device: str | None = None,
                        max_queries: int | None = None, batch_size: int | None = None, seed: int | None = None,
                        curve: bool = False, masking_check: bool = False, examples: int = 6,
                        progress: bool = True, intervals: int = 1000, source: Any = None,
                        surrogate: Any = None, before: Any = None, executor: Any = None
                        ) -> tuple[dict[str, Any], Any, Any]:
    """(flat metrics, RunEvaluation, config) of a model; the command's side of :func:`rdml.evaluate`.

    ``checkpoint`` is any path :func:`rdml.ensemble.load.load_any_model` takes (training checkpoint or run
    directory, ensemble run directory or manifest.json, ensemble member file); ``source`` a loaded
    user model (:func:`user_model_source`) instead. ``before(cfg)`` runs once the model's config is
    known and before any evaluation (the tracking pre-check of ``--track``). ``executor``: the attack
    workers of ``--workers`` (:mod:`rdml.distributed.attack_workers`).
    """
    from rdml.api import evaluate
    from rdml.data import build_datasets
    from rdml.eval.protocol import evaluation_sets
    from rdml.train import resolve_device

    loaded = _load(checkpoint, source)
    model, cfg = loaded.model, loaded.config
    if before is not None:
        before(cfg)
    if progress:
        print(f"evaluating {loaded.description}")
    dev = resolve_device(cfg, device)
    queries, gallery = evaluation_sets(build_datasets(cfg.data))
    run = evaluate(model, queries, gallery, profile or cfg.eval.profile or None, device=dev,
                   batch_size=batch_size or cfg.data.eval_batch_size,
                   seed=cfg.eval.attack_seed if seed is None else seed, kmeans_seed=cfg.eval.kmeans_seed,
                   max_queries=max_queries if max_queries is not None else cfg.eval.max_queries, intervals=intervals,
                   normalize=None if source is not None else False, curve=curve, masking_check=masking_check,
                   keep_examples=examples, progress=progress, name=str(checkpoint or loaded.description),
                   run_seed=None if source is not None else cfg.train.seed, surrogate=surrogate,
                   model_info=_model_info(checkpoint, loaded, cfg) if source is None else
                   {"description": loaded.description}, executor=executor)
    return dict(run.metrics), run, cfg


@contextlib.contextmanager
def _attack_workers(args: argparse.Namespace) -> Iterator[Any]:
    """``--workers N``: N Ray attack workers (joining ``--address`` or a local loopback-only Ray) for the
    whole command, released at its end; else None (everything in this process)."""
    if not args.workers:
        if args.threads != 1 or args.address:
            raise ConfigError("--threads and --address go with --workers N (the Ray attack workers)")
        yield None
        return
    import os

    from rdml.config import build_config
    from rdml.distributed.attack_workers import RayAttackWorkers
    from rdml.distributed.connect import connect

    started = connect(build_config({}), args.address, num_cpus=max(os.cpu_count() or 1, args.workers * args.threads))
    try:
        with RayAttackWorkers(args.workers, threads=args.threads) as workers:
            if not args.quiet:
                devices = sorted({w["device"] for w in workers.info})
                print(f"{args.workers} attack workers ({', '.join(devices)}, {args.threads} thread(s) each)")
            yield workers
    finally:
        if started:
            import ray

            ray.shutdown()


def _tracking_precheck(cfg: Any) -> None:
    """--track: the model's tracking store must answer before minutes of attacks, not after them."""
    from rdml.tracking import check_reachable, resolved_uri

    check_reachable(resolved_uri(cfg.tracking))


def _track_start(args: argparse.Namespace, cfg: Any, path: str) -> tuple[str | None, bool]:
    """The MLflow run to log into (``--run-id``, else a new one) and whether it was created here."""
    from rdml import tracking

    if args.run_id is not None:
        return args.run_id, False
    return tracking.start_run(cfg, tags={"rdml.kind": "evaluate", "rdml.checkpoint": str(path)},
                              run_name=f"evaluate-{cfg.name}"), True


def _track(run_id: str | None, created: bool, cfg: Any, metrics: dict[str, Any], files: list[Path],
           card: Path | None) -> None:
    """Log to MLflow through rdml.tracking (the only mlflow importer); the card goes to ``cards/``."""
    from rdml import tracking
    from rdml.eval.cards import ARTIFACT_DIR

    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
    tracking.log_metrics(run_id, numeric, tracking=cfg.tracking)
    for f in files:
        tracking.log_artifact(run_id, f, "evaluation", tracking=cfg.tracking)
    if card is not None:
        tracking.log_artifact(run_id, card, ARTIFACT_DIR, tracking=cfg.tracking)
    if created:
        tracking.end_run(run_id, tracking=cfg.tracking)
    print(f"logged to MLflow run {run_id}")


def _card_file(args: argparse.Namespace, out: Path | None, metrics: dict[str, Any], name: str, index: int,
               count: int) -> Path:
    """Where a model's card goes: --card, beside --json, or rdml-cards/ in the working directory."""
    from rdml.eval.cards import CARD_SUFFIX, card_path

    if args.card is not None:
        card = Path(args.card)
        return card if count == 1 else card.with_name(f"{card.name.removesuffix(CARD_SUFFIX).removesuffix('.json')}"
                                                      f".run{index}{CARD_SUFFIX}")
    if out is not None:
        return card_path(out if count == 1 else out.with_name(f"{out.stem}.run{index}{out.suffix}"))
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name.removesuffix(".pt")) or "model"
    return Path("rdml-cards") / f"{stem}.{metrics.get('profile', 'benign')}{CARD_SUFFIX}"


def _write_card(run_eval: Any, path: Path, run_id: str | None, cfg: Any) -> Path:
    """The evaluation's card with the MLflow run it is logged to, written to ``path``."""
    from rdml.eval.cards import write_card

    card = dict(run_eval.info["card"])
    if run_id is not None:
        from rdml.tracking import uri_of

        card["mlflow"] = {"run_id": run_id, "experiment": cfg.tracking.experiment,
                          "tracking_uri": uri_of(run_id, cfg.tracking)}
    run_eval.info["card"] = card
    return write_card(card, path)


def _write(out: Path, metrics: dict[str, Any], run: Any) -> list[Path]:
    """The JSON, and beside it the per-query Parquet and the examples for `rdml report`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    files = [out]
    rob = getattr(run, "robustness", None)
    if rob is not None and rob.outcomes:
        files.append(rob.write_parquet(out.with_suffix(".per_query.parquet")))
    if rob is not None and rob.examples is not None:
        import torch

        ex = out.with_suffix(".examples.pt")
        torch.save(rob.examples, ex)
        files.append(ex)
    return files


def run(args: argparse.Namespace) -> int:
    models: list[tuple[str, Any]] = [(str(path), None) for path in args.checkpoint]
    if args.model is not None:
        models.append((args.model, user_model_source(args.model, args.weights, args.data, args.config)))
    elif args.weights or args.data or args.config:
        raise ConfigError("--weights, --data and --config go with --model (a model rdml did not train); a checkpoint "
                          "brings its own config and data set")
    if not models:
        raise ConfigError("nothing to evaluate: pass a checkpoint or run directory, or --model package.module:factory "
                          "--data NAME")
    surrogate = load_surrogate(args.surrogate)
    before = _tracking_precheck if args.track else None
    results, runs, cfgs = {}, [], []
    with _attack_workers(args) as executor:
        for path, source in models:
            metrics, run_eval, cfg = evaluate_checkpoint(
                None if source is not None else path, args.profile, device=args.device, max_queries=args.max_queries,
                batch_size=args.batch_size, seed=args.seed, curve=args.curve, masking_check=args.masking_check,
                examples=args.examples, progress=not args.quiet, intervals=args.intervals, source=source,
                surrogate=surrogate, before=before, executor=executor,
            )
            results[path], runs, cfgs = metrics, [*runs, run_eval], [*cfgs, cfg]
    rows = dict(results)
    if len(runs) > 1:
        from rdml.eval.compare import combine

        combined = combine(runs, n_boot=args.intervals or 1000)
        rows["mean over runs"] = {k: iv.value for k, iv in combined.items()}
        rows["mean over runs"].update({f"ci.{k}.{side}": getattr(iv, side) for k, iv in combined.items()
                                       for side in ("low", "high")})
    _print_table(rows, f"rdml evaluate {' '.join(results)}")
    for path, run_eval in zip(results, runs, strict=True):
        for flag in run_eval.flags:
            print(f"WARNING{f' ({path})' if len(runs) > 1 else ''}: {flag}")
    files: list[Path] = []
    out = Path(args.json_out) if args.json_out else None
    if out is not None:
        if len(runs) == 1:
            files = _write(out, next(iter(results.values())), runs[0])
        else:  # one JSON per run beside the combined one
            per_run = {}
            for i, (path, run_eval) in enumerate(zip(results, runs, strict=True)):
                written = _write(out.with_name(f"{out.stem}.run{i}{out.suffix}"), results[path], run_eval)
                per_run[str(path)] = written[0].name
                files += written
            out.write_text(json.dumps({"runs": per_run, "combined": rows["mean over runs"]}, indent=2, sort_keys=True))
            files.append(out)
        print(f"wrote {', '.join(str(f) for f in files)}")
    for i, ((path, metrics), run_eval, cfg) in enumerate(zip(results.items(), runs, cfgs, strict=True)):
        run_id, created = _track_start(args, cfg, path) if args.track else (None, False)
        card = _write_card(run_eval, _card_file(args, out, metrics, path, i, len(runs)), run_id, cfg)
        print(f"wrote robustness card {card}")
        if args.track:
            _track(run_id, created, cfg, metrics, files, card)
    return 0
