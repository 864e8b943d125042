"""A quick look at the self-transfer modes on digits at equal forward+backward passes (a smoke test, not evidence).

Trains the ``digits-eat`` ensemble once per mode in one process (the Ray backend takes identical steps),
every mode given the same number of passes per member as ``none``'s recipe (the minmax members' cost
per step: T + 1, ``cross_member`` T + 2, ``ensemble_gradient`` M T + 1: ``bench/eat_evidence.py``'s
:func:`nominal_passes`), then evaluates the combined embedding white-box with ``quick`` (ERS) and
``clustering28``. One seed and 64 queries cannot separate the modes: the evidence (3 seeds, the whole
mnist5k test set, intervals) is ``bench/eat_evidence.py`` -> docs/results-eat.md.

Usage: ``python bench/eat_modes.py [--seed 0] [--out eat_modes.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="none,cross_member,ensemble_gradient")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    import torch
    from eat_evidence import nominal_passes

    from rdml.config import load_config
    from rdml.data import build_datasets
    from rdml.ensemble import LocalEnsemble
    from rdml.ensemble.summary import robustness_of

    torch.set_num_threads(1)
    base = load_config("digits-eat", [f"train.seed={args.seed}", "tracking.enabled=false"])
    budget = base.train.epochs * base.ensemble.steps_per_epoch * nominal_passes(base)  # passes per member of `none`
    rows = []
    for mode in args.modes.split(","):
        cfg = load_config("digits-eat", [f"ensemble.self_transfer={mode}", f"train.seed={args.seed}",
                                         "tracking.enabled=false"])
        steps = round(budget / nominal_passes(cfg))
        splits = build_datasets(cfg.data)
        ens = LocalEnsemble(cfg, splits.train)
        t0 = time.perf_counter()
        passes = sum(ens.step(s)[0]["passes"] for s in range(steps))
        train_s = time.perf_counter() - t0
        r = robustness_of({"e": ens.ensemble_model().eval()}, splits.test, cfg, ["quick", "clustering28"])["e"]
        nmis = {k: v for k, v in r.items() if k.startswith("clustering.") and k.endswith(".nmi")}
        row = {"mode": mode, "steps": steps, "passes_per_member": passes, "train_s": train_s, "ers": r.get("ers"),
               "clean_nmi": r.get("clustering.clean.nmi"), "worst_nmi": min(nmis.values()), **nmis}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{'mode':<18} {'steps':>5} {'passes':>7} {'ERS':>6} {'clean NMI':>9} {'worst NMI':>9} {'train s':>8}")
    for r in rows:
        print(f"{r['mode']:<18} {r['steps']:>5} {r['passes_per_member']:>7.0f} {r['ers']:>6.1f} "
              f"{r['clean_nmi']:>9.3f} {r['worst_nmi']:>9.3f} {r['train_s']:>8.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
