"""How close the attack suite runs to the cost of its PGD passes alone.

Runs an attack profile (default ``rob28``: the 10 ERS attacks, 32 steps each) on the digits test set
against a model (a quick vanilla C2F2 trained here, or ``--checkpoint``), counts the forward+backward
passes the PGD engine made and the batch size of each, then times exactly that many plain
forward+backward passes (input gradient, frozen parameters, same batch sizes) in the same process.

    efficiency = plain passes time / attack wall time        (goal: >= 0.8)

The difference is everything the suite does besides the passes: loading images, embedding the
database, choosing targets, distances to the database, projections, metrics.

    .venv/bin/python bench/attack_speed.py [--checkpoint CKPT] [--profile rob28] [--max-queries N]
                                           [--threads T] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def _model(args: argparse.Namespace, workdir: Path):
    from rdml.train import fit, load_model

    if args.checkpoint:
        return load_model(args.checkpoint, device=args.device)
    from rdml.config import load_config

    cfg = load_config("digits", [f"train.epochs={args.epochs}", f"train.output_dir={workdir / 'runs'}",
                                 "tracking.enabled=false", "train.eval_every=0"])
    started = time.perf_counter()
    result = fit(cfg)
    print(f"trained a vanilla {cfg.model.arch} on digits for {args.epochs} epochs in "
          f"{time.perf_counter() - started:.1f} s")
    return load_model(result.checkpoint, device=args.device)


def plain_passes(model, shape: tuple[int, ...], batch_passes: list[tuple[int, int]], device) -> float:
    """Seconds for the given (batch size, passes) list of plain input-gradient forward+backward passes."""
    from rdml.attacks.pgd import frozen_eval

    x_full = torch.rand(max(b for b, _ in batch_passes), *shape, device=device)
    started = time.perf_counter()
    with frozen_eval(model):
        for size, passes in batch_passes:
            x = x_full[:size]
            for _ in range(passes):
                xg = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(model(xg).sum(), xg)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--profile", default="rob28")
    parser.add_argument("--max-queries", type=int, default=None, help="attack a subset (default: the whole test set)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="training epochs when no checkpoint is given")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rdml.data import build_datasets
    from rdml.eval.robustness import evaluate_robustness

    with tempfile.TemporaryDirectory() as tmp:
        model, cfg = _model(args, Path(tmp))
    test = build_datasets(cfg.data).test
    device = torch.device(args.device)
    # warm-up (allocator, kernels) so neither side pays it
    plain_passes(model, tuple(test[0][0].shape), [(args.batch_size, 2)], device)

    # The box this runs on may be shared and its load drifts, so each attack is timed right next to its
    # plain passes (attack, then its passes) and the totals are compared.
    from rdml.attacks.ers import ers
    from rdml.attacks.profiles import AttackProfile, load_profile
    from rdml.attacks.runner import embed_indices

    profile = load_profile(args.profile)
    shape = tuple(test[0][0].shape)
    attack_s = plain_s = 0.0
    started = time.perf_counter()
    labels = test.labels
    emb = embed_indices(model, test, list(range(len(test))), args.batch_size, device)
    attack_s += time.perf_counter() - started
    metrics: dict[str, float] = {}
    batch_passes: list[tuple[int, int]] = []
    for key, spec in profile.keyed():
        one = AttackProfile(name=key, attacks=(spec.model_copy(update={"label": key}),),
                            max_queries=profile.max_queries)
        started = time.perf_counter()
        result = evaluate_robustness(model, test, one, device=device, max_queries=args.max_queries,
                                     batch_size=args.batch_size, progress=False, database=(emb, labels))
        attack_s += time.perf_counter() - started
        mine = [bp for o in result.outcomes for bp in o.batch_passes]
        plain_s += plain_passes(model, shape, mine, device)
        batch_passes += mine
        metrics.update(result)
    if profile.ers:
        metrics["ers"] = ers(metrics)
    passes = sum(p for _, p in batch_passes)
    images = sum(b * p for b, p in batch_passes)
    print(f"profile {args.profile} on digits test ({len(result.indices)} of {len(test)} samples attacked), "
          f"model {cfg.model.arch}/{cfg.model.embedding_dim}, device {device}, threads {torch.get_num_threads()}")
    print(f"ERS {metrics.get('ers', float('nan')):.2f}  " +
          "  ".join(f"{k.split('.', 1)[1]}={v:.3g}" for k, v in metrics.items() if k.startswith("attacks.")))
    print(f"attack wall time        {attack_s:8.2f} s (database embedding, targets, passes, metrics)")
    print(f"forward+backward passes {passes:8d} (batches of <= {args.batch_size}; {images} image passes)")
    print(f"plain passes time       {plain_s:8.2f} s (same passes, same batch sizes, same run)")
    print(f"efficiency              {plain_s / attack_s:8.3f}  (goal >= 0.8)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
