"""Pilot runs for the EAT member recipe on mnist5k: does a member train at eps 77/255 with full reach without collapse?

Each pilot trains one member exactly as ``rdml ensemble --members 1`` would, i.e. ``rdml train``
(:func:`rdml.train.fit`) with the pilot's overrides on top of ``--base`` (default the shipped
``mnist5k-eat`` recipe), for ``--epochs`` epochs, then measures on the 1,000 test images: clean R@1,
the embedding spread (RMS pairwise distance; collapse below 0.05), and rob28 on ``--queries`` seeded
queries (ERS, ES:D/spread, the collapse flag). One JSON line per pilot, then a table.

    nice -n 19 .venv/bin/python bench/eat_recipe_pilots.py --threads 1 --out runs/eat-pilots
    nice -n 19 .venv/bin/python bench/eat_recipe_pilots.py --only minmax-rs --epochs 4

The pilots (overrides of the base recipe) are named in ``PILOTS``; their numbers are recorded in
docs/eat.md ("Member recipe at the evaluation eps").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_MINMAX = ["defense.name=minmax", "defense.pgd.eps=77/255", "defense.pgd.alpha=auto", "defense.pgd.steps=8"]
PILOTS: dict[str, list[str]] = {
    # plain min-max on the triplet loss (triplets fixed per step), reach 2.5 eps, no random start
    "minmax": [*_MINMAX, "defense.pgd.random_start=false", "loss.name=triplet"],
    # the same with a uniform random start in the ball
    "minmax-rs": [*_MINMAX, "defense.pgd.random_start=true", "loss.name=triplet"],
    # proxy-anchor (the loss EAT uses), random start
    "minmax-pal-rs": [*_MINMAX, "defense.pgd.random_start=true", "loss.name=proxy_anchor"],
    # half clean, half adversarial loss (lambda = 0.5, docs/eat.md), random start
    "minmax-rs-clean0.5": [*_MINMAX, "defense.pgd.random_start=true", "loss.name=triplet",
                           "defense.minmax_clean_weight=0.5"],
    # ACT members (anti-collapse by construction) at the same eps and reach, as the fallback
    "act": ["defense.name=act", "defense.pgd.eps=77/255", "defense.pgd.alpha=auto", "defense.pgd.steps=8",
            "defense.pgd.random_start=false", "loss.name=triplet", "defense.minmax_clean_weight=0"],
}


def run_pilot(name: str, base: str, epochs: int, out: Path, queries: int, extra: list[str]) -> dict:
    import torch

    from rdml.attacks.ers import embedding_spread
    from rdml.config import load_config
    from rdml.data import build_datasets
    from rdml.eval.embed import embed
    from rdml.eval.robustness import evaluate_robustness
    from rdml.train import fit

    overrides = [*PILOTS[name], f"train.epochs={epochs}", "train.eval_every=0", f"train.output_dir={out}",
                 "tracking.enabled=false", "train.keep_checkpoints=1", *extra]
    if not any(o.startswith("defense.name=minmax") for o in overrides):
        overrides = [o for o in overrides if not o.startswith("defense.minmax_clean_weight")]
    cfg = load_config(base, overrides)
    t0 = time.perf_counter()
    result = fit(cfg, run_dir=out / name, progress=False)
    train_s = time.perf_counter() - t0
    from rdml.train import load_model

    model, _ = load_model(result.checkpoint)
    model.eval()
    test = build_datasets(cfg.data).test
    emb, _ = embed(model, test, batch_size=256)
    t1 = time.perf_counter()
    rob = evaluate_robustness(model, test, "rob28", max_queries=queries, progress=False)
    hist = result.history
    row = {
        "pilot": name, "overrides": PILOTS[name], "epochs": epochs, "steps": int(sum(h.get("train/steps", 0) for h in hist)),
        "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t1, 1),
        "recall@1": result.metrics.get("eval/recall@1"), "nmi": result.metrics.get("eval/nmi"),
        "test_spread": embedding_spread(emb), "ers": rob.get("ers"), "collapse": rob.get("collapse"),
        "esd_over_spread": rob.get("attacks.ES:D/spread"), "ES:D": rob.get("attacks.ES:D"),
        "train_spread_by_epoch": [h.get("train/embedding_spread") for h in hist],
        "train_loss_by_epoch": [h.get("train/loss") for h in hist],
        "pgd_iters": hist[-1].get("train/pgd_iters"), "passes_per_step": hist[-1].get("train/passes_per_iter"),
        "threads": torch.get_num_threads(),
    }
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="mnist5k", help="recipe the pilots override (default: the vanilla mnist5k)")
    ap.add_argument("--only", nargs="+", choices=list(PILOTS), default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--queries", type=int, default=100, help="rob28 on this many seeded test queries")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "eat-pilots")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    log = args.out / "pilots.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(PILOTS):
        row = run_pilot(name, args.base, args.epochs, args.out, args.queries, args.extra)
        rows.append(row)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(f"{'pilot':<20} {'R@1':>6} {'spread':>7} {'ERS':>6} {'ESD/spr':>8} {'collapse':>8} {'train s':>8}")
    for r in rows:
        print(f"{r['pilot']:<20} {100 * r['recall@1']:6.1f} {r['test_spread']:7.3f} {r['ers']:6.1f} "
              f"{r['esd_over_spread']:8.3f} {r['collapse']:8.0f} {r['train_s']:8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
