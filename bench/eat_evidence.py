"""The EAT evidence on mnist5k: is the ensemble more robust than its members, which self-transfer mode, at what cost?

Trains, for every seed, one ``mnist5k-eat`` ensemble per self-transfer mode (members at the evaluation
eps 77/255 with full reach, every mode given the *same number of forward+backward passes per member*)
and one single model of the same defense given the ensemble's *total* compute (``--members 1``, which is
``rdml train``). It then evaluates, white-box and end to end on the whole 1,000-image test set, the
combined embedding of every ensemble, every one of its members and the single model with ``rob28`` and
``clustering28``, runs the gradient-masking guard on every ensemble (:mod:`rdml.ensemble.guard`), and
writes ``docs/results-eat.md``:

(a) every ensemble against its best member, paired by seed; (b) every mode against ``none`` at equal
passes; (c) every ensemble against the single model at equal total compute; the guard on the same
runs; bootstrap 95% intervals (two-level over seeds and queries, paired where the comparison is; NMI:
t-intervals over seeds) and every MLflow run id.

Everything goes to one MLflow parent run (experiment ``eat-evidence``) with a child run per ensemble
(or single model) and seed. The work is a list of jobs (train, eval, guard per run and seed); finished
jobs are reused and an interrupted training resumes from its last checkpoint, so the command runs in
parts: ``--budget-min 85`` starts no job that would end after 85 minutes; rerun the same command until
it reports nothing left. The resumable job state is ``bench/robust28.py``'s (imported from it).

    .venv/bin/python bench/eat_evidence.py --budget-min 85            # one part; repeat until done
    .venv/bin/python bench/eat_evidence.py --threads 1 --budget-min 85 &  # two parts at once, one core each:
    .venv/bin/python bench/eat_evidence.py --threads 1 --budget-min 85    # each claims the next free job
    .venv/bin/python bench/eat_evidence.py --status                   # what is done, what is left
    .venv/bin/python bench/eat_evidence.py --only report              # rewrite docs/results-eat.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from robust28 import State, child_run, ensure_parent  # noqa: E402 - the resumable state file and its MLflow runs

RECIPE = "mnist5k-eat"
MODES = ("none", "cross_member", "ensemble_gradient")
SINGLE = "single"
EXPERIMENT = "eat-evidence"
PROFILES = ("rob28", "clustering28")
CLUSTER_ATTACKS = ("centroid_class", "centroid_kmeans", "centroid_class_dynamic", "embedding_shift")
#: first-guess job durations on one core of the 2-core machine (minutes), replaced by measured ones
ESTIMATE_MIN = {"train:ens": 40, "train:single": 40, "eval:ensemble": 45, "eval:member": 16, "eval:single": 16,
                "guard": 10}
OVERRIDES: list[str] = []  # --set: smoke runs of the machinery only (the results use the recipe as shipped)
BOOT = [1000]
ATTACK_STEPS: list[int | None] = [None]  # --attack-steps: smoke runs only (the results use the profiles' 32 steps)


def profile(name: str):
    """The attack profile ``name``, with every attack cut to ``--attack-steps`` steps in a smoke run."""
    from rdml.attacks.profiles import load_profile

    prof = load_profile(name)
    steps = ATTACK_STEPS[0]
    if steps is None:
        return prof
    return prof.model_copy(update={"attacks": tuple(
        s.model_copy(update={"steps": steps, "alpha": s.eps / steps}) for s in prof.attacks)})


@dataclass(frozen=True)
class Job:
    kind: str  # train | eval | guard
    run: str  # ens-<mode> | single
    seed: int
    target: str = ""  # eval: ensemble | member_<k> | single

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.run}:{self.target + ':' if self.target else ''}s{self.seed}"

    @property
    def run_key(self) -> str:
        return f"{self.run}-s{self.seed}"

    @property
    def tags(self) -> dict[str, str]:
        return {"rdml.run": self.run, "rdml.seed": str(self.seed)}

    @property
    def estimate_key(self) -> str:
        if self.kind == "train":
            return "train:single" if self.run == SINGLE else "train:ens"
        if self.kind == "eval":
            return f"eval:{'member' if self.target.startswith('member_') else self.target}"
        return self.kind


def jobs_for(modes: list[str], seeds: list[int], members: int) -> list[Job]:
    """Seed-major: every job of seed 0 (trainings, then evaluations and guards) before any of seed 1.

    A part that runs out of time leaves complete seeds behind, and the report of complete seeds is a
    table with every comparison rather than trained models nobody has evaluated yet.
    """
    runs = [f"ens-{m}" for m in modes] + [SINGLE]
    jobs: list[Job] = []
    for s in seeds:
        jobs += [Job("train", r, s) for r in runs]
        for r in runs:
            targets = [SINGLE] if r == SINGLE else ["ensemble", *(f"member_{k}" for k in range(members))]
            jobs += [Job("eval", r, s, t) for t in targets]
        jobs += [Job("guard", f"ens-{m}", s) for m in modes]
    return jobs


def estimate_min(state: State, job: Job) -> float:
    same = [v["seconds"] / 60 for k, v in state.data["done"].items() if v.get("estimate") == job.estimate_key]
    return max(same) if same else ESTIMATE_MIN[job.estimate_key]


def ready(state: State, job: Job) -> bool:
    return job.kind == "train" or state.done(Job("train", job.run, job.seed))


# ------------------------------------------------------------------------------------------ budgets


def nominal_passes(cfg) -> int:
    """Forward+backward passes per member and step of a minmax member (fixed PGD iterations, no early stop)."""
    t, m, mode = cfg.defense.pgd.steps, cfg.ensemble.members, cfg.ensemble.self_transfer
    return (m * t if mode == "ensemble_gradient" else t) + 1 + (mode == "cross_member")


def _schedule(total_steps: int, pass_len: int) -> tuple[int, int]:
    """(epochs, steps per epoch <= one pass) whose product is as close to ``total_steps`` as it gets."""
    epochs = max(1, math.ceil(total_steps / pass_len))
    return epochs, max(1, min(pass_len, round(total_steps / epochs)))


def run_config(run: str, seed: int, out: Path, uri: str, members: int):
    """The config of an ensemble (mode) or of the single model, with its equal-passes schedule."""
    import numpy as np

    from rdml.config import load_config
    from rdml.data import build_datasets
    from rdml.ensemble.member import ensemble_steps_per_epoch, pass_length
    from rdml.ensemble.parts import member_subsets

    common = [f"train.seed={seed}", f"train.output_dir={out / 'train'}", f"tracking.uri={uri}",
              f"tracking.experiment={EXPERIMENT}", "tracking.log_model=false", f"tracking.run_name={run}-s{seed}",
              f"ensemble.members={members}", *OVERRIDES]
    base = load_config(RECIPE, [*common, "ensemble.self_transfer=none"])
    train = build_datasets(base.data).train
    e = base.ensemble
    subsets = member_subsets(train.labels, e.members, e.parts, e.split, seed=seed)
    spe = ensemble_steps_per_epoch(base, [pass_length(base, train, s, k) for k, s in enumerate(subsets)])
    budget = base.train.epochs * spe * nominal_passes(base)  # passes per member of the `none` ensemble
    if run == SINGLE:  # the ensemble's total compute in one model on the whole set (= rdml train)
        one = load_config(RECIPE, [*common, "ensemble.members=1", "ensemble.parts=1", "ensemble.self_transfer=none"])
        full = pass_length(one, train, np.arange(len(train)), 0)
        epochs, steps = _schedule(round(members * budget / nominal_passes(one)), full)
        return load_config(RECIPE, [*common, "ensemble.members=1", "ensemble.parts=1", "ensemble.self_transfer=none",
                                    f"train.epochs={epochs}", f"ensemble.steps_per_epoch={steps}"])
    mode = run.removeprefix("ens-")
    cfg = load_config(RECIPE, [*common, f"ensemble.self_transfer={mode}"])
    epochs, steps = _schedule(round(budget / nominal_passes(cfg)), spe)
    return load_config(RECIPE, [*common, f"ensemble.self_transfer={mode}", f"train.epochs={epochs}",
                                f"ensemble.steps_per_epoch={steps}"])


# ------------------------------------------------------------------------------------------ jobs


def train(job: Job, state: State, out: Path, uri: str, parent: str, members: int) -> dict:
    from rdml import tracking
    from rdml.data import build_datasets
    from rdml.ensemble import LocalEnsemble, load_manifest, train_ensemble

    cfg = run_config(job.run, job.seed, out, uri, members)
    run_id = child_run(state, job, cfg, parent, EXPERIMENT)
    run_dir = out / "train" / job.run_key
    splits = build_datasets(cfg.data)
    resume = load_manifest(run_dir) if (run_dir / "manifest.json").exists() else None

    def log(metrics: dict[str, float], step: int) -> None:
        tracking.log_metrics(run_id, metrics, step, tracking=uri)

    result = train_ensemble(cfg, LocalEnsemble(cfg, splits.train), splits, run_dir, run_id=run_id, resume=resume,
                            log=log, progress=True)
    passes = [h["train/passes"] for h in result.history if "train/passes" in h]
    per_member = float(sum(passes)) if resume is None else float(result.steps * sum(passes) / max(len(passes), 1))
    info = {"run_dir": str(run_dir), "steps": result.steps, "epochs": cfg.train.epochs,
            "steps_per_epoch": cfg.ensemble.steps_per_epoch, "passes_per_member": per_member,
            "members": cfg.ensemble.members, "recall@1": result.metrics.get("ensemble/recall@1"),
            "spread": result.metrics.get("ensemble/embedding_spread")}
    tracking.log_metrics(run_id, {"passes_per_member": per_member}, result.steps, tracking=uri)
    return info


def _model(job: Job, out: Path):
    from rdml.ensemble.load import load_ensemble_model

    model, cfg = load_ensemble_model(out / "train" / job.run_key)
    if job.target == "ensemble":
        return model, cfg
    if job.target == SINGLE:
        return model.members[0], cfg  # one member on the whole set: the plain model (the same embedding)
    return model.members[int(job.target.removeprefix("member_"))], cfg


def evaluate(job: Job, state: State, out: Path, uri: str, parent: str, max_queries: int | None) -> dict:
    from rdml import tracking
    from rdml.data import build_datasets
    from rdml.eval.compare import evaluate_run

    model, cfg = _model(job, out)
    run_id = child_run(state, job, cfg, parent, EXPERIMENT)
    test = build_datasets(cfg.data).test
    info = {}
    for name in PROFILES:
        result = evaluate_run(model, test, profile(name), name=f"{job.run}/{job.target}", seed=job.seed,
                              progress=True, max_queries=max_queries, n_boot=BOOT[0], nmi_boot=BOOT[0] // 5)
        files = result.save(out / "eval" / f"{job.run_key}.{job.target}.{name}")
        tracking.log_metrics(run_id, {f"{job.target}/{name}/{k}": v for k, v in result.metrics.items()},
                             tracking=uri)
        for f in files:
            tracking.log_artifact(run_id, f, "eat-evidence", tracking=uri)
        if name == "rob28":
            info.update(ers=result.metrics.get("ers"), collapse=result.metrics.get("collapse"))
    return info


def guard(job: Job, state: State, out: Path, uri: str, parent: str, max_queries: int | None) -> dict:
    from rdml import tracking
    from rdml.data import build_datasets
    from rdml.ensemble.guard import transfer_guard

    model, cfg = _model(Job("eval", job.run, job.seed, "ensemble"), out)
    run_id = child_run(state, job, cfg, parent, EXPERIMENT)
    steps = ATTACK_STEPS[0] or 32
    result = transfer_guard(model, build_datasets(cfg.data).test, n_boot=BOOT[0], max_items=max_queries, steps=steps,
                            alpha=max(3 / 255, 77 / 255 / steps))
    path = out / "eval" / f"{job.run_key}.guard.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    flat = {f"guard/{src}/{k}": v for src, row in result["sources"].items() for k, v in row.items()}
    tracking.log_metrics(run_id, {**flat, "guard/holds": float(result["holds"])}, tracking=uri)
    tracking.log_artifact(run_id, path, "eat-evidence", tracking=uri)
    return {"holds": result["holds"], "file": str(path)}


def run_job(job: Job, state: State, out: Path, uri: str, parent: str, args) -> dict:
    if job.kind == "train":
        return train(job, state, out, uri, parent, args.members)
    if job.kind == "eval":
        return evaluate(job, state, out, uri, parent, args.max_queries)
    return guard(job, state, out, uri, parent, args.max_queries)


# ------------------------------------------------------------------------------------------ command


def close_finished_runs(state: State, left: list[Job], uri: str, parent: str) -> None:
    """Mark FINISHED in MLflow every child run with no job ``left``, and the parent once nothing is left.

    A run stays RUNNING while any of its jobs is left (a later part logs into it), so the MLflow UI tells
    an unfinished run from a finished one.
    """
    from rdml import tracking

    open_runs = {j.run_key for j in left}
    for run_key, info in state.data["runs"].items():
        if run_key not in open_runs:
            tracking.end_run_if_running(info["run_id"], "FINISHED", tracking=uri)
    if not left:
        tracking.end_run_if_running(parent, "FINISHED", tracking=uri)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "eat-evidence", help="state, checkpoints, evaluations")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds (0..N-1)")
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--only", nargs="+", choices=["train", "eval", "guard", "report"], default=None,
                    help="run only these kinds of job")
    ap.add_argument("--budget-min", type=float, default=None, help="start no job that would end after this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-queries", type=int, default=None,
                    help="attack at most N queries (a smoke run only: the results need the whole test set)")
    ap.add_argument("--status", action="store_true", help="print what is done and what is left, then exit")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results-eat.md")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (smoke runs of the machinery only)")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples per interval (default 1000)")
    ap.add_argument("--attack-steps", type=int, default=None,
                    help="cut every attack to N PGD steps (a smoke run only: the results use the profiles' 32)")
    args = ap.parse_args(argv)
    OVERRIDES[:] = args.overrides
    BOOT[0] = args.boot
    ATTACK_STEPS[0] = args.attack_steps

    import torch

    from rdml.tracking import resolve_uri

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    state = State(args.out / "state.json")
    state.data.setdefault("settings", {})
    uri = state.data.get("tracking_uri") or resolve_uri(args.tracking_uri)
    seeds = list(range(args.seeds))
    all_jobs = jobs_for(args.modes, seeds, args.members)
    jobs = [j for j in all_jobs if not args.only or j.kind in args.only]
    if args.status:
        for j in jobs:
            info = state.data["done"].get(j.key)
            status = f"done {info['seconds']:6.0f} s" if info else f"todo (~{estimate_min(state, j):.0f} min)"
            print(f"{j.key:42s} {status}")
        left = [j for j in jobs if not state.done(j)]
        print(f"{len(left)} of {len(jobs)} jobs left, about {sum(estimate_min(state, j) for j in left):.0f} min "
              "of one core")
        return 0
    parent = ensure_parent(state, uri, EXPERIMENT)
    state.update(lambda d: d["settings"].update(modes=args.modes, seeds=args.seeds, members=args.members,
                                                max_queries=args.max_queries, overrides=args.overrides,
                                                attack_steps=args.attack_steps))
    started, t0, ran = datetime.now(UTC).isoformat(timespec="seconds"), time.perf_counter(), []
    if args.only != ["report"]:
        while True:
            state.reload()
            todo = [j for j in jobs if not state.done(j)]
            runnable = [j for j in todo if ready(state, j) and not state.claimed_by_other(j)]
            if not runnable:
                if any(state.claimed_by_other(j) for j in all_jobs):  # another part may unlock more
                    time.sleep(20)
                    continue
                for j in todo:
                    print(f"{j.key}: waits for the training of {j.run_key}")
                break
            job = runnable[0]
            elapsed = (time.perf_counter() - t0) / 60
            if args.budget_min is not None and elapsed + estimate_min(state, job) > args.budget_min:
                print(f"budget: {elapsed:.0f} min used; next job {job.key} (~{estimate_min(state, job):.0f} min) "
                      "would not fit; rerun the same command to continue")
                break
            if not state.claim(job):  # another part took it between the reload and now
                continue
            print(f"[{datetime.now().strftime('%H:%M:%S')}] {job.key} ...", flush=True)
            j0 = time.perf_counter()
            try:
                info = run_job(job, state, args.out, uri, parent, args)
            except BaseException:
                state.release(job)
                raise
            state.finish(job, time.perf_counter() - j0, estimate=job.estimate_key, **info)  # also drops the claim
            ran.append(job.key)
            print(f"[{datetime.now().strftime('%H:%M:%S')}] {job.key} done in {time.perf_counter() - j0:.0f} s",
                  flush=True)
    part = {"started": started, "minutes": round((time.perf_counter() - t0) / 60, 1), "jobs": ran,
            "selection": " ".join(args.only or ["all"]), "threads": args.threads}
    state.update(lambda d: d["parts"].append(part))
    left = [j for j in all_jobs if not state.done(j)]
    close_finished_runs(state, left, uri, parent)
    print(f"{sum(not state.done(j) for j in jobs)} job(s) of this selection left")
    if not left or args.only == ["report"]:
        from eat_evidence_report import write_results

        doc = write_results(args.out, state.data, args.doc, uri=uri, parent=parent, modes=args.modes, seeds=seeds,
                            members=args.members, boot=BOOT[0], left=[j.key for j in left])
        print(f"wrote {doc}")
    print(f"{len(left)} job(s) left" + ("" if left else "; evidence complete"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
