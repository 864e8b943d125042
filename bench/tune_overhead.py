"""Tune overhead: the same training run inside a one-trial Tune search vs `rdml train`'s in-process path.

Both runs train the identical config (same seed, same data, same MLflow logging to a temp sqlite
store) in this process tree, one after the other, and the ratio of wall times is printed:

* direct: ``start_run`` + ``fit(cfg, callbacks=[RunLogger])`` + ``end_run`` (what ``rdml train --no-ray`` does);
* tune:   ``run_search`` over a space with a single grid point, no ASHA, no attacks: parent run, Tuner,
  one trial process running the same ``fit`` with ``tune.report`` per epoch, Pareto summary.

Ray is started before the clock starts (a session pays that once, not per search); its start time is
printed separately. Goal: tune/direct < 1.15.

    .venv/bin/python bench/tune_overhead.py [--epochs 3] [--steps 30] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="max steps per epoch")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in both runs (= the trial's CPUs)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")

    import ray
    import torch

    from rdml.config import load_config
    from rdml.tracking import RunLogger, end_run, start_run
    from rdml.train import fit
    from rdml.tune.search import run_search
    from rdml.tune.space import SearchSpace

    tmp = Path(tempfile.mkdtemp(prefix="rdml-tune-bench-"))
    overrides = [
        "defense.name=hm", "defense.pgd.steps=4", f"train.epochs={args.epochs}",
        f"train.max_steps_per_epoch={args.steps}", f"train.threads={args.threads}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"train.output_dir={tmp / 'runs'}",
        "tracking.log_model=false",
    ]
    space = SearchSpace(
        name="overhead", base="digits", overrides=overrides, metric="recall@1", mode="max", robustness=None,
        num_samples=1, params={"defense.hm_schedule": {"grid": ["lga"]}}, scheduler={"asha": None},
        resources={"cpu": args.threads, "gpu": 0}, max_failures=0,
    )
    cfg = load_config("digits", [*overrides, "defense.hm_schedule=lga"])

    t0 = time.perf_counter()
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0

    # warm-up (imports, dataset build, first-call costs) so neither side pays it
    warm = load_config("digits", [*overrides, "train.epochs=1", "train.max_steps_per_epoch=2", "tracking.enabled=false"])
    fit(warm, run_dir=tmp / "warmup")

    direct, tuned = [], []
    for i in range(args.repeat):
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        run_id = start_run(cfg)
        result = fit(cfg, callbacks=[RunLogger(run_id, cfg.tracking, final_artifacts=False)],
                     run_dir=tmp / f"direct-{i}")
        end_run(run_id)
        direct.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        res = run_search(space, storage_path=tmp / "tune", name=f"overhead-{i}")
        tuned.append(time.perf_counter() - t0)
        trial_time = res.trials[0].get("time_total_s", float("nan"))
        print(f"repeat {i}: direct {direct[-1]:.1f} s (R@1 {result.metrics.get('eval/recall@1', float('nan')):.3f}), "
              f"tune {tuned[-1]:.1f} s (trial's own time {trial_time:.1f} s, R@1 {res.trials[0].get('recall@1'):.3f})")
    d, t = statistics.median(direct), statistics.median(tuned)
    print(f"ray.init (once per session, not counted): {ray_start:.1f} s")
    print(f"direct fit: {d:.1f} s | one-trial Tune search: {t:.1f} s | tune/direct = {t / d:.3f} "
          f"(overhead {100 * (t / d - 1):+.1f}%; goal < +15%)")
    ray.shutdown()


if __name__ == "__main__":
    main()
