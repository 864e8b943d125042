"""EAT scaling: the same ensemble on Ray (one actor per member) vs one process stepping members in turn.

Measured side by side in one run, on the same data, seeds and exchange (the two backends take
identical steps, see tests/test_eat_distributed.py):

* wall time of ``--steps`` ensemble steps (after one warm-up step; actor start-up excluded) on Ray,
  in one process with 1 torch thread, and in one process with every core;
* the speed-ups (single process / Ray);
* the exchange fraction: the members' ``ray.put`` + ``ray.get`` of records as a share of their step
  time, and the driver's idle share (members waiting at the step boundary for the slowest one);
* the exchange volume per member and step for the 224x224 ResNet-18 setting, for M = 2, 3, 5
  (computed from the record layouts, nothing is run): ``ensemble_gradient`` before (an all-gather of
  every member's input gradients on all M batches at every PGD iteration), with a gradient reduction
  (reduce-scatter + step directions, for comparison), and now (member weights once per step).

Usage::

    python bench/eat_scaling.py                       # 2 members, ensemble_gradient, minmax members
    python bench/eat_scaling.py --mode cross_member --steps 20
    python bench/eat_scaling.py --sizes-only          # the exchange-volume table alone

With ``--tracking-uri`` the measured figures are logged as one MLflow run (experiment ``eat-scaling``).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _config(mode: str, members: int, pgd_steps: int, batch_pairs: int):
    from rdml.config import build_config

    return build_config({
        "data": {"name": "digits", "batch_pairs": batch_pairs},
        "model": {"arch": "c2f2", "embedding_dim": 128},
        "defense": {"name": "minmax", "pgd": {"eps": 77 / 255, "alpha": "auto", "steps": pgd_steps,
                                              "random_start": True}},
        "train": {"seed": 0, "device": "cpu", "threads": 1},
        "ensemble": {"members": members, "parts": members, "self_transfer": mode, "cpus_per_member": 1},
        "tracking": {"enabled": False},
    })


def _timed(backend, steps: int) -> tuple[float, list[float]]:
    backend.step(0)  # warm-up (allocations, replicas, first exchange)
    if hasattr(backend, "reset_timing"):
        backend.reset_timing()
    t0 = time.perf_counter()
    losses = []
    for s in range(1, steps + 1):
        losses.append(sum(m["loss"] for m in backend.step(s)))
    return time.perf_counter() - t0, losses


def _mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB" if n >= 2**20 else f"{n / 2**10:8.1f} KiB"


def weight_bytes(arch: str, embedding_dim: int, image_size: int, channels: int, classes: int, loss: str) -> int:
    """Bytes of a member's weights (model state + loss state, float32), as a snapshot carries them."""
    from rdml.config import build_config
    from rdml.losses import build_loss
    from rdml.models import build_model

    logging.disable(logging.WARNING)  # "training from scratch": nothing is trained here
    try:
        cfg = build_config({"model": {"arch": arch, "embedding_dim": embedding_dim}, "loss": {"name": loss}})
        model = build_model(cfg.model, channels, image_size)
        loss_fn = build_loss(cfg.loss, classes, embedding_dim)
    finally:
        logging.disable(logging.NOTSET)
    return sum(v.numel() * v.element_size() for m in (model, loss_fn) for v in m.state_dict().values())


def print_sizes(batch: int = 112, pgd_steps: int = 8) -> None:
    from rdml.ensemble import Geometry, get_transfer, gradient_allgather_bytes, gradient_reduce_bytes

    weights = weight_bytes("resnet18", 512, 224, 3, 100, "proxy_anchor")
    print(f"exchange per member and step, ResNet-18 224x224 (512-d, proxy-anchor, weights {_mib(weights).strip()}), "
          f"batch {batch}, PGD {pgd_steps} steps (computed):")
    print(f"  {'M':>2}  {'ensemble_gradient':<34} {'published':>12} {'received':>12}")
    for members in (2, 3, 5):
        before = gradient_allgather_bytes(batch, 3, 224, members, pgd_steps)
        reduce = gradient_reduce_bytes(batch, 3, 224, members, pgd_steps)
        after = get_transfer("ensemble_gradient").bytes_per_step(Geometry(batch, 3, 224, members, pgd_steps, weights))
        for label, row in (("before: all-gather of gradients", before), ("a gradient reduction", reduce),
                           ("now: member weights", after)):
            print(f"  {members:>2}  {label:<34} {_mib(row['published'])} {_mib(row['received'])}")
    for mode in ("cross_member", "none"):
        row = get_transfer(mode).bytes_per_step(Geometry(batch, 3, 224, 3, pgd_steps, weights))
        print(f"   3  {mode:<34} {_mib(row['published'])} {_mib(row['received'])}")


def main(argv: list[str] | None = None) -> int:
    from rdml.ensemble import SELF_TRANSFER

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="ensemble_gradient", choices=list(SELF_TRANSFER))
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pgd-steps", type=int, default=8)
    p.add_argument("--batch-pairs", type=int, default=32)
    p.add_argument("--sizes-only", action="store_true", help="print the exchange-volume table and stop")
    p.add_argument("--tracking-uri", default=None, help="log the figures as one MLflow run (experiment eat-scaling)")
    args = p.parse_args(argv)
    if args.sizes_only:
        print_sizes()
        return 0

    import ray
    import torch

    from rdml.data import build_datasets
    from rdml.distributed.eat import RayEnsemble
    from rdml.ensemble import LocalEnsemble

    cores = os.cpu_count() or 1
    cfg = _config(args.mode, args.members, args.pgd_steps, args.batch_pairs)
    train = build_datasets(cfg.data).train
    print(f"EAT scaling: {args.members} minmax members, mode={args.mode}, {args.steps} steps, batch "
          f"{2 * args.batch_pairs}, PGD {args.pgd_steps} steps, c2f2 on digits 28x28, {cores} cores")

    ray.init(num_cpus=max(cores, args.members), include_dashboard=False, log_to_driver=False)
    try:
        backend = RayEnsemble(cfg, train)
        t_ray, ray_losses = _timed(backend, args.steps)
        timing = backend.timing
        backend.shutdown()
    finally:
        ray.shutdown()

    results = {}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        results[threads] = _timed(LocalEnsemble(cfg, train), args.steps)
    t_one, local_losses = results[1]
    t_all = results[cores][0]

    member_step = timing["step"] / max(timing["steps"], 1)
    exchange = (timing["put"] + timing["get"]) / max(timing["step"] + timing["put"] + timing["get"], 1e-9)
    idle = 1.0 - (timing["step"] + timing["put"] + timing["get"]) / max(args.members * timing["wall"], 1e-9)
    same = ray_losses == local_losses
    print(f"single process, 1 thread   : {t_one:7.2f} s  ({t_one / args.steps:.3f} s/step)")
    if cores != 1:
        print(f"single process, {cores} threads  : {t_all:7.2f} s  ({t_all / args.steps:.3f} s/step)")
    print(f"Ray, 1 actor per member    : {t_ray:7.2f} s  ({t_ray / args.steps:.3f} s/step)")
    print(f"speed-up vs 1 thread       : {t_one / t_ray:.2f}x")
    if cores != 1:
        print(f"speed-up vs {cores} threads      : {t_all / t_ray:.2f}x")
    print(f"exchange (put+get)         : {100 * exchange:.2f}% of member time ({member_step:.3f} s/step/member)")
    print(f"idle at the step boundary  : {100 * max(idle, 0.0):.2f}% of member time (waiting for the slowest)")
    print(f"published per member/step  : {_mib(timing['bytes'] / max(timing['steps'], 1)).strip()} (this run)")
    print(f"identical losses in-process: {same}")
    if args.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
        mlflow.set_experiment("eat-scaling")
        with mlflow.start_run(run_name=f"eat-scaling-{args.mode}-m{args.members}") as run:
            mlflow.log_params({"mode": args.mode, "members": args.members, "steps": args.steps, "cores": cores,
                               "pgd_steps": args.pgd_steps, "batch": 2 * args.batch_pairs})
            mlflow.log_metrics({"single_1thread_s": t_one, f"single_{cores}threads_s": t_all, "ray_s": t_ray,
                                "speedup_vs_1thread": t_one / t_ray, f"speedup_vs_{cores}threads": t_all / t_ray,
                                "exchange_fraction": exchange, "idle_fraction": max(idle, 0.0),
                                "published_bytes_per_step": timing["bytes"] / max(timing["steps"], 1),
                                "identical_losses": float(same)})
        print(f"mlflow run: {run.info.run_id}")
    print_sizes()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
