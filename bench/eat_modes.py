"""Which self-transfer mode gives the most robust ensemble on digits at equal training cost?

Trains the ``digits-eat`` ensemble once per mode, in one process (the Ray backend takes identical
steps), giving every mode the same number of forward+backward passes:

* ``ensemble_gradient``: each member differentiates through all M batches at every PGD iteration,
  M*(T+1) + 1 passes per member and step;
* ``cross_member``: (T+1) + 2 (its own craft, the update, the transferred batch);
* ``none``: (T+1) + 1.

Then evaluates the combined embedding (white-box, end to end) with the ``quick`` ERS profile and the
``clustering28`` attacks, and prints one row per mode. Used to choose EnsembleConfig.self_transfer
(docs/eat.md).

Usage: ``python bench/eat_modes.py [--base-steps 30] [--seed 0]``
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-steps", type=int, default=30, help="steps of ensemble_gradient; others get equal passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="ensemble_gradient,cross_member,none")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    import torch

    from rdml.config import load_config
    from rdml.data import build_datasets
    from rdml.ensemble import LocalEnsemble
    from rdml.ensemble.report import robustness_of

    torch.set_num_threads(1)
    rows = []
    for mode in args.modes.split(","):
        cfg = load_config("digits-eat", [f"ensemble.self_transfer={mode}", f"train.seed={args.seed}",
                                         "tracking.enabled=false"])
        m, t = cfg.ensemble.members, cfg.defense.pgd.steps
        passes = {"ensemble_gradient": m * (t + 1) + 1, "cross_member": t + 3, "none": t + 2}
        budget = args.base_steps * passes["ensemble_gradient"]
        steps = round(budget / passes[mode])
        splits = build_datasets(cfg.data)
        ens = LocalEnsemble(cfg, splits.train)
        t0 = time.perf_counter()
        for s in range(steps):
            ens.step(s)
        train_s = time.perf_counter() - t0
        model = ens.ensemble_model().eval()
        r = robustness_of({"e": model}, splits.test, cfg, ["quick", "clustering28"])["e"]
        row = {"mode": mode, "steps": steps, "passes_per_member": steps * passes[mode], "train_s": train_s,
               "ers": r.get("ers"), "clean_nmi": r.get("clustering.clean.nmi"),
               "clean_r1": r.get("clustering.clean.recall@1"),
               "worst_nmi": min(v for k, v in r.items() if k.startswith("clustering.") and k.endswith(".nmi")),
               **{k: v for k, v in r.items() if k.startswith("clustering.") and k.endswith(".nmi")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{'mode':<18} {'steps':>5} {'passes':>7} {'ERS':>6} {'clean NMI':>9} {'worst NMI':>9} {'train s':>8}")
    for r in rows:
        print(f"{r['mode']:<18} {r['steps']:>5} {r['passes_per_member']:>7} {r['ers']:>6.1f} "
              f"{r['clean_nmi']:>9.3f} {r['worst_nmi']:>9.3f} {r['train_s']:>8.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
