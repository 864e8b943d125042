"""Attack evaluation spread over Ray workers: speed-up against one process, and identical numbers.

Runs one robustness evaluation (default: ``rob28``, the ten ERS attacks with 32 PGD steps, on the
first ``--max-queries`` of mnist5k's 1,000 test images) three ways in one run, every model on one
torch thread:

1. in this process (``rdml evaluate`` without ``--workers``);
2. on 1 Ray attack worker, then 3. on 2 (``rdml evaluate --workers N``, :mod:`rdml.eval.shards`).

For each it prints the wall time of the evaluation (workers already started: their start is printed
apart), the speed-up against (1), the attack time (the time spent inside the attack loops, summed
over shards) and the fraction of the workers' time spent outside them:

    outside = 1 - attack time / (workers x wall time)

(for (1), workers = 1: embedding the gallery, the clean checks, merging and the summary), and whether
every per-query value, PGD iteration count and pass count equals the one-process run's, bit for bit.
The goal is a speed-up of at least 1.8 with 2 workers on 2 idle cores; on a busy machine the numbers
say more about the load (printed before and after) than about rdml.

    .venv/bin/python bench/attack_scaling.py [--checkpoint CKPT] [--max-queries 256] [--profile rob28]
        [--batch-size 32] [--device cpu|cuda] [--json out.json] [--tracking-uri URI]

Without ``--checkpoint`` the model is an untrained C2F2 (seeded): the attacks' cost does not depend on
the training. With ``--device cuda`` each worker takes one GPU (the machine needs 2 for the 2-worker row).
With ``--tracking-uri`` the figures are logged as one MLflow run (experiment ``attack-scaling``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def per_query(result: Any) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for o in result.outcomes:
        out.update({f"{o.key}/{name}": v for name, v in o.values.items()})
        out[f"{o.key}/iterations"] = o.iterations
        out[f"{o.key}/passes"] = np.asarray([o.passes])
    for o in result.clustering:
        out[f"clustering/{o.key}"] = np.asarray(o.adv_emb)
    return out


def identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a)


def attack_seconds(result: Any) -> float:
    return sum(o.seconds for o in result.outcomes) + sum(o.seconds for o in result.clustering)


def model_and_data(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, str]:
    from rdml.config import build_config
    from rdml.data import build_datasets

    if args.checkpoint:
        from rdml.train import load_model

        model, cfg = load_model(args.checkpoint, device="cpu")
        return model, build_datasets(cfg.data).test, f"{args.checkpoint} ({cfg.name})"
    from rdml.models import build_model

    cfg = build_config({"data": {"name": "mnist5k"}, "model": {"arch": "c2f2", "embedding_dim": 512}})
    test = build_datasets(cfg.data).test
    torch.manual_seed(0)
    return build_model(cfg.model, in_channels=1, image_size=28), test, "untrained C2F2 (seed 0) on mnist5k"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--profile", default="rob28")
    ap.add_argument("--max-queries", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args()

    import ray

    from rdml.config import build_config
    from rdml.distributed.attack_workers import RayAttackWorkers
    from rdml.distributed.connect import connect
    from rdml.eval.robustness import evaluate_robustness

    torch.set_num_threads(1)
    model, test, what = model_and_data(args)
    model = model.to(args.device).eval()
    kw = dict(device=args.device, max_queries=args.max_queries, batch_size=args.batch_size, progress=False,
              intervals=0, seed=0)
    print(f"model: {what}; profile {args.profile}, {args.max_queries} queries in batches of {args.batch_size}, "
          f"device {args.device}; load before: {load()}", flush=True)

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    single = evaluate_robustness(model, test, args.profile, **kw)
    wall = time.perf_counter() - started
    reference = per_query(single)
    rows.append({"mode": "one process", "workers": 1, "wall_s": wall, "start_s": 0.0,
                 "attack_s": attack_seconds(single), "identical": True})
    print(f"one process: {wall:.1f} s", flush=True)

    connect(build_config({}), num_cpus=max(os.cpu_count() or 1, max(args.workers)))
    try:
        for n in args.workers:
            t0 = time.perf_counter()
            with RayAttackWorkers(n, threads=1, gpus=args.device.startswith("cuda")) as workers:
                start_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                result = evaluate_robustness(model, test, args.profile, executor=workers, **kw)
                wall = time.perf_counter() - t0
            rows.append({"mode": f"{n} Ray worker{'s' if n > 1 else ''}", "workers": n, "wall_s": wall,
                         "start_s": start_s, "attack_s": attack_seconds(result),
                         "identical": identical(reference, per_query(result))})
            print(f"{n} worker(s): {wall:.1f} s (+{start_s:.1f} s to start them)", flush=True)
    finally:
        ray.shutdown()

    base = rows[0]["wall_s"]
    for row in rows:
        row["speedup"] = base / row["wall_s"]
        row["outside"] = 1.0 - row["attack_s"] / (row["workers"] * row["wall_s"])
    print(f"\nload after: {load()}")
    print(f"{'mode':<16}{'wall s':>9}{'speed-up':>10}{'attack s':>10}{'outside':>9}{'start s':>9}  identical")
    for r in rows:
        print(f"{r['mode']:<16}{r['wall_s']:9.1f}{r['speedup']:10.2f}{r['attack_s']:10.1f}{r['outside']:9.1%}"
              f"{r['start_s']:9.1f}  {'yes' if r['identical'] else 'NO'}")
    summary = {"model": what, "profile": args.profile, "max_queries": args.max_queries,
               "batch_size": args.batch_size, "device": args.device, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if args.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
        mlflow.set_experiment("attack-scaling")
        with mlflow.start_run(run_name=f"attack-scaling-{args.profile}-{args.device}") as run:
            mlflow.log_params({k: v for k, v in summary.items() if k != "rows"})
            for r in rows:
                tag = f"w{r['workers']}" if r["mode"] != "one process" else "single"
                mlflow.log_metrics({f"{tag}/{k}": float(r[k]) for k in ("wall_s", "speedup", "attack_s", "outside",
                                                                       "start_s", "identical")})
            mlflow.log_dict(summary, "attack_scaling.json")
        print(f"mlflow run: {run.info.run_id}")
    if not all(r["identical"] for r in rows):
        raise SystemExit("the sharded numbers differ from the one-process run")


if __name__ == "__main__":
    main()
