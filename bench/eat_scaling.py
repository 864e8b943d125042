"""EAT scaling: the same ensemble run on Ray (one actor per member) vs one process stepping members in turn.

Measured side by side in one run, on the same data, seeds and step protocol (the two backends take
identical steps, see tests/test_eat_distributed.py):

* wall time of ``--steps`` ensemble steps (after one warm-up step; actor start-up excluded),
* the speed-up (single process / Ray),
* the fraction of a member's step time spent exchanging statistics (``ray.put`` + ``ray.get`` of
  records / gradients), and separately the time members wait at the rendezvous (synchronisation:
  waiting for the slowest member plus the round trip),
* the statistics size per step for the 224x224 ResNet-18 setting (computed from the record layout,
  nothing is run).

Usage::

    python bench/eat_scaling.py                       # 2 members, default self-transfer mode
    python bench/eat_scaling.py --mode cross_member --steps 20
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _config(mode: str, members: int, pgd_steps: int, batch_pairs: int):
    from rdml.config import build_config

    return build_config({
        "data": {"name": "digits", "batch_pairs": batch_pairs},
        "model": {"arch": "c2f2", "embedding_dim": 128},
        "defense": {"pgd": {"eps": 77 / 255, "alpha": 3 / 255, "steps": pgd_steps}},
        "train": {"seed": 0, "device": "cpu", "threads": 1},
        "ensemble": {"members": members, "parts": members, "self_transfer": mode, "cpus_per_member": 1},
        "tracking": {"enabled": False},
    })


def _timed(backend, steps: int) -> tuple[float, list[float]]:
    backend.step(0)  # warm-up (allocations, first exchange)
    if hasattr(backend, "reset_timing"):
        backend.reset_timing()
    t0 = time.perf_counter()
    losses = []
    for s in range(1, steps + 1):
        losses.append(sum(m["loss"] for m in backend.step(s)))
    return time.perf_counter() - t0, losses


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.2f} KiB"


def main(argv: list[str] | None = None) -> int:
    from rdml.config import EnsembleConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default=EnsembleConfig().self_transfer,
                   choices=["ensemble_gradient", "cross_member", "none"])
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pgd-steps", type=int, default=8)
    p.add_argument("--batch-pairs", type=int, default=32)
    args = p.parse_args(argv)

    import ray
    import torch

    from rdml.data import build_datasets
    from rdml.distributed.eat import RayEnsemble
    from rdml.ensemble import LocalEnsemble, bytes_per_step

    cfg = _config(args.mode, args.members, args.pgd_steps, args.batch_pairs)
    train = build_datasets(cfg.data).train
    print(f"EAT scaling: {args.members} members, mode={args.mode}, {args.steps} steps, batch "
          f"{2 * args.batch_pairs}, PGD {args.pgd_steps} steps, c2f2 on digits 28x28, {os.cpu_count()} cores")

    ray.init(num_cpus=max(os.cpu_count() or 1, args.members), include_dashboard=False, log_to_driver=False)
    try:
        backend = RayEnsemble(cfg, train)
        t_ray, ray_losses = _timed(backend, args.steps)
        timing = backend.timing
        backend.shutdown()
    finally:
        ray.shutdown()

    results = {}
    for threads in (1, os.cpu_count() or 1):
        torch.set_num_threads(threads)
        local = LocalEnsemble(cfg, train)
        results[threads] = _timed(local, args.steps)
    t_local, local_losses = results[1]

    per_step = timing["step"] / max(timing["steps"], 1)
    exchange = (timing["put"] + timing["get"]) / max(timing["step"], 1e-9)
    wait = timing["wait"] / max(timing["step"], 1e-9)
    same = max(abs(a - b) for a, b in zip(ray_losses, local_losses, strict=True)) <= 1e-4 * max(map(abs, local_losses))
    print(f"single process, 1 thread  : {t_local:7.2f} s  ({t_local / args.steps:.3f} s/step)")
    for threads, (t, _) in results.items():
        if threads != 1:
            print(f"single process, {threads} threads : {t:7.2f} s  ({t / args.steps:.3f} s/step)")
    print(f"Ray, 1 actor per member   : {t_ray:7.2f} s  ({t_ray / args.steps:.3f} s/step)")
    print(f"speed-up vs 1 thread      : {t_local / t_ray:.2f}x")
    for threads, (t, _) in results.items():
        if threads != 1:
            print(f"speed-up vs {threads} threads     : {t / t_ray:.2f}x")
    print(f"exchange (put+get)        : {100 * exchange:.2f}% of member step time ({per_step:.3f} s/step/member)")
    print(f"rendezvous wait (sync)    : {100 * wait:.2f}% of member step time")
    print(f"published per member/step : {_mb(timing['bytes'] / max(timing['steps'], 1))} (digits)")
    print(f"same losses as in-process : {same}")
    print("statistics per member and step, ResNet-18 224x224, batch 112, 3 members, PGD 8 steps (computed):")
    for mode in ("none", "cross_member", "ensemble_gradient"):
        sizes = bytes_per_step(112, 3, 224, mode, members=3, pgd_steps=8)
        detail = ", ".join(f"{k} {_mb(v)}" for k, v in sizes.items() if v and k != "total")
        print(f"  {mode:<18}: {_mb(sizes['total']):>11}  ({detail})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
