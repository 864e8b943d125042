"""The training-time defenses side by side on the embedded digits data, with one shared PGD budget.

Trains vanilla, EST[R], ACT[R], HM[S,gLGA], HM[S,gLGA]&ICS and Panum (the shipped ``digits*`` recipes:
C2F2, rob28 eps/alpha 77/255, 3/255, training eta 8) with the same seed and data order, then attacks
each model with the rob28 ERS profile (32 PGD steps) and prints benign R@1 / mAP / NMI, the ten attack
outcomes, ERS, the cost per iteration (forward/backward passes) and wall time, in one table.

    nice python bench/defenses_digits.py                       # full recipes (8 epochs; long on 2 cores)
    python bench/defenses_digits.py --quick                     # 1 epoch x 6 steps, 100 queries (a smoke run)
    python bench/defenses_digits.py --defenses digits digits-hm-ics --epochs 4 --max-queries 200

Expected shape (docs/methods.md#published-reference-points): vanilla has the best R@1 and an ERS near 4;
every defense trades R@1 for ERS; ACT and HM&ICS are the strongest; EST is weak at small eta.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

RECIPES = ["digits", "digits-est", "digits-act", "digits-hm", "digits-hm-ics", "digits-panum"]
ATTACK_COLUMNS = ["CA+", "CA-", "QA+", "QA-", "TMA", "ES:D", "ES:R", "LTM", "GTM", "GTT"]


def _attack_value(metrics: dict[str, float], name: str) -> float:
    return float(metrics.get(f"attacks.{name}", float("nan")))


def run(recipe: str, args: argparse.Namespace, out_dir: Path) -> dict[str, float]:
    import torch

    from rdml import tracking
    from rdml.config import load_config
    from rdml.data import build_datasets
    from rdml.eval.robustness import evaluate_robustness
    from rdml.train import fit, load_model

    overrides = [f"train.output_dir={out_dir / recipe}", f"train.seed={args.seed}", "train.eval_every=0",
                 f"tracking.uri={args.tracking_uri}", "tracking.experiment=defenses-digits", "tracking.log_model=false"]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.steps is not None:
        overrides.append(f"train.max_steps_per_epoch={args.steps}")
    cfg = load_config(recipe, overrides)
    run_id = tracking.start_run(cfg, run_name=recipe)
    t0 = time.perf_counter()
    result = fit(cfg, callbacks=[tracking.RunLogger(run_id, cfg.tracking)], device=torch.device("cpu"))
    train_s = time.perf_counter() - t0
    final = result.history[-1]
    model, _ = load_model(result.checkpoint)
    test = build_datasets(cfg.data).test
    t1 = time.perf_counter()
    rob = evaluate_robustness(model, test, "rob28", seed=args.seed, max_queries=args.max_queries, progress=False)
    row = {
        "recipe": recipe,
        "defense": cfg.defense.name + ("+ics" if cfg.defense.ics else ""),
        "R@1": 100 * final.get("eval/recall@1", float("nan")),
        "mAP": 100 * final.get("eval/map", float("nan")),
        "NMI": 100 * final.get("eval/nmi", float("nan")),
        **{c: _attack_value(rob, c) for c in ATTACK_COLUMNS},
        "ERS": float(rob.get("ers", float("nan"))),
        "passes/iter": final.get("train/passes_per_iter", float("nan")),
        "pgd_iters": final.get("train/pgd_iters", float("nan")),
        "train_s": train_s,
        "attack_s": time.perf_counter() - t1,
        "mlflow_run": run_id,
    }
    tracking.log_metrics(run_id, {k: v for k, v in rob.items() if isinstance(v, (int, float))})
    tracking.end_run(run_id)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--defenses", nargs="+", default=RECIPES, help="recipe names")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs (default: the recipe's 8)")
    ap.add_argument("--steps", type=int, default=None, help="override train.max_steps_per_epoch")
    ap.add_argument("--max-queries", type=int, default=None, help="attack a seeded subset of test images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 epoch x 6 steps, 100 attacked queries")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store the runs are logged to")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.steps = args.epochs or 1, args.steps or 6
        args.max_queries = args.max_queries or 100

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.defenses:
            rows.append(run(recipe, args, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    cols = ["defense", "R@1", "mAP", "NMI", *ATTACK_COLUMNS, "ERS", "passes/iter", "pgd_iters", "train_s",
            "mlflow_run"]
    print()
    print(" | ".join(f"{c:>11}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>11.3f}" if isinstance(r[c], float) else f"{r[c]:>11}" for c in cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
