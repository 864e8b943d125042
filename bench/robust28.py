"""The fair 28x28 robustness benchmark: six defenses x seeds on mnist5k, controls, intervals, adaptive checks.

Trains vanilla, EST, ACT, HM[S,gLGA], HM[S,gLGA]&ICS and Panum (the shipped ``mnist5k*`` recipes) with
``--seeds`` seeds each, evaluates every model and the controls (the untrained model of each seed, and
vanilla with its embedding shrunk by a scale-only change) with the ``rob28`` profile on the whole
1,000-image test set, runs the adaptive profile (``rob28-adaptive``: 4x steps, 5 restarts, and the
2x-eps row) on a fixed query subset, an epsilon curve per model, and writes ``docs/results-mnist5k.md``:
the table with bootstrap 95% intervals, an ERS-vs-R@1 plot, the epsilon curves and every MLflow run id.

Everything goes to one MLflow parent run (experiment ``robust28``) with a child run per model and seed.
The work is a list of jobs (train, evaluate, adaptive, curve per model and seed); finished jobs are
reused, so the command is resumable and runs in parts: ``--budget-min 85`` starts no job that would
end after 85 minutes (each part fits in 90 minutes on 2 cores); rerun the same command until it
reports nothing left. Every part's wall time is recorded in the state file and the results doc.

    .venv/bin/python bench/robust28.py --budget-min 85          # one part; repeat until done
    .venv/bin/python bench/robust28.py --only report            # rewrite docs/results-mnist5k.md
    .venv/bin/python bench/robust28.py --only train --threads 1 --budget-min 85 &   # two parts at once,
    .venv/bin/python bench/robust28.py --only eval adaptive curve --threads 1 --budget-min 85  # one core each
    .venv/bin/python bench/robust28.py --status                 # what is done, what is left
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

MODELS = {  # benchmark name -> shipped recipe
    "vanilla": "mnist5k",
    "est": "mnist5k-est",
    "act": "mnist5k-act",
    "hm": "mnist5k-hm",
    "hm-ics": "mnist5k-hm-ics",
    "panum": "mnist5k-panum",
    "catride": "mnist5k-catride",
}
CONTROLS = ("untrained", "shrunk")
CURVE_ATTACK = "LTM:eps=77/255:alpha=3/255:pgditer=32"  # robust R@1 under LTM; alpha scales with eps
CURVE_EPS = (0, 8, 16, 32, 48, 77, 154)  # x/255
CURVE_QUERIES = 200
TITLES = {"vanilla": "vanilla", "est": "EST[R]", "act": "ACT[R]", "hm": "HM[S,gLGA]", "hm-ics": "HM[S,gLGA]&ICS",
          "panum": "Panum (p, rho=1)", "catride": "CA-TRIDE", "untrained": "untrained (control)", "shrunk": "vanilla shrunk x0.05 (control)"}
#: first-guess job durations on 2 cores (minutes), replaced by measured ones as jobs finish
ESTIMATE_MIN = {"train:vanilla": 2, "train:panum": 4, "train:est": 25, "train:act": 25, "train:hm": 30,
                "train:hm-ics": 32, "train:catride": 30, "eval": 6, "adaptive": 14, "curve": 2}
EXPERIMENT = "robust28"


@dataclass(frozen=True)
class Job:
    kind: str  # train | eval | adaptive | curve
    model: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.model}:s{self.seed}"

    @property
    def run_key(self) -> str:
        return f"{self.model}-s{self.seed}"

    @property
    def tags(self) -> dict[str, str]:
        return {"rdml.model": self.model, "rdml.seed": str(self.seed)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class State:
    """``state.json`` in the output directory: MLflow ids, finished jobs, measured durations, parts.

    Several parts may run at once (one core each): every change is a read-modify-write of the file under
    an exclusive lock, so no part loses another's work, and a part claims a job before running it, so no
    two run the same one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {"runs": {}, "done": {}, "parts": []}
        self.reload()

    def reload(self) -> None:
        if self.path.exists():
            self.data = json.loads(self.path.read_text())

    def update(self, change) -> None:
        """Apply ``change(data)`` to the newest content of the file, atomically with respect to other parts."""
        import fcntl

        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.reload()
            change(self.data)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
            os.replace(tmp, self.path)

    def done(self, job: Job) -> bool:
        return job.key in self.data["done"]

    def _held_by_other(self, data: dict, key: str) -> bool:
        held = data.get("claims", {}).get(key)
        return bool(held) and held["pid"] != os.getpid() and _alive(held["pid"])

    def claimed_by_other(self, job) -> bool:
        """Whether another live part on this machine is running ``job`` (a dead part's claim is stale)."""
        return self._held_by_other(self.data, job.key)

    def claim(self, job) -> bool:
        """Atomically take ``job`` for this process unless it is done or another live part holds it."""
        taken = []

        def change(d: dict) -> None:
            if job.key in d["done"] or self._held_by_other(d, job.key):
                return
            d.setdefault("claims", {})[job.key] = {"pid": os.getpid(),
                                                   "since": datetime.now(UTC).isoformat(timespec="seconds")}
            taken.append(True)

        self.update(change)
        return bool(taken)

    def release(self, job) -> None:
        self.update(lambda d: d.setdefault("claims", {}).pop(job.key, None))

    def finish(self, job: Job, seconds: float, **info) -> None:
        """Record ``job`` as done and drop any claim on it, in one atomic change."""

        def change(d: dict) -> None:
            d["done"][job.key] = {"seconds": round(seconds, 1), **info}
            d.get("claims", {}).pop(job.key, None)

        self.update(change)

    def estimate_min(self, job: Job) -> float:
        same = [v["seconds"] / 60 for k, v in self.data["done"].items()
                if k.split(":")[0] == job.kind and (job.kind != "train" or k.split(":")[1] == job.model)]
        if same:
            return max(same)
        return ESTIMATE_MIN.get(f"train:{job.model}" if job.kind == "train" else job.kind, 10)

    def ready(self, job: Job) -> bool:
        """Whether the jobs this one needs are finished (an evaluation needs its training, a check its evaluation)."""
        if job.kind == "train" or job.model == "untrained" and job.kind == "eval":
            return True
        if job.kind == "eval":
            return self.done(Job("train", "vanilla" if job.model in CONTROLS else job.model, job.seed))
        return self.done(Job("eval", job.model, job.seed))


def jobs_for(models: list[str], seeds: list[int], adaptive_seeds: list[int]) -> list[Job]:
    """Training first (seed-major: a complete first seed early), then evaluations, then the extra checks."""
    jobs = [Job("train", m, s) for s in seeds for m in models]
    evaluated = models + [c for c in CONTROLS if "vanilla" in models]
    jobs += [Job("eval", m, s) for s in seeds for m in evaluated]
    jobs += [Job("adaptive", m, s) for s in adaptive_seeds for m in evaluated]
    jobs += [Job("curve", m, s) for s in adaptive_seeds for m in evaluated]
    return jobs


def ensure_parent(state: State, uri: str, experiment: str = EXPERIMENT) -> str:
    """The benchmark's MLflow parent run (named after its experiment), created once and kept in the state."""
    from rdml import tracking
    from rdml.config import build_config

    if state.data.get("parent_run_id"):
        return state.data["parent_run_id"]
    cfg = build_config({"name": experiment, "tracking": {"uri": uri, "experiment": experiment, "log_model": False}})
    run_id = tracking.start_run(cfg, tags={"rdml.kind": "benchmark"}, run_name=experiment)
    state.update(lambda d: d.update(parent_run_id=run_id, tracking_uri=uri))
    return run_id


OVERRIDES: list[str] = []  # --set: for smoke runs of the machinery only (the results use the recipes as shipped)
BOOT = [1000]  # --boot: bootstrap resamples of every interval (NMI: a fifth of them, each re-clusters the test set)


def run_config(model: str, seed: int, out: Path, uri: str):
    from rdml.config import load_config

    return load_config(MODELS[model], [
        f"train.seed={seed}", f"train.output_dir={out / 'train'}", f"tracking.uri={uri}",
        f"tracking.experiment={EXPERIMENT}", "tracking.log_model=false", f"tracking.run_name={model}-s{seed}",
        *OVERRIDES,
    ])


def child_run(state: State, job, cfg, parent: str, experiment: str = EXPERIMENT) -> str:
    """The MLflow child run of a job's (model or run, seed), created once and reused by its every job."""
    from rdml import tracking

    state.reload()
    if job.run_key not in state.data["runs"]:
        run_id = tracking.start_run(cfg, parent_run_id=parent, run_name=job.run_key,
                                    tags={"rdml.kind": "benchmark-run", "rdml.benchmark": experiment, **job.tags})
        state.update(lambda d: d["runs"].setdefault(job.run_key, {"run_id": run_id}))
    return state.data["runs"][job.run_key]["run_id"]


def train(job: Job, state: State, out: Path, uri: str, parent: str) -> dict:
    from rdml import tracking
    from rdml.train import fit

    cfg = run_config(job.model, job.seed, out, uri)
    run_id = child_run(state, job, cfg, parent)
    run_dir = out / "train" / job.run_key
    last = run_dir / "checkpoints" / "last.pt"
    result = fit(cfg, callbacks=[tracking.RunLogger(run_id, cfg.tracking, log_model=False)], run_dir=run_dir,
                 resume=last if last.exists() else None)
    tracking.end_run(run_id, "FINISHED", tracking=uri)
    final = result.history[-1]
    return {"checkpoint": str(result.checkpoint), "recall@1": final.get("eval/recall@1"),
            "pgd_iters": final.get("train/pgd_iters"), "passes_per_iter": final.get("train/passes_per_iter")}


def model_for(job: Job, out: Path, uri: str):
    """(model, config) of a benchmark entry: a trained checkpoint, or a control built from vanilla's seed."""
    from rdml.eval.controls import ShrunkModel, untrained_model
    from rdml.train import load_model

    source = "vanilla" if job.model in CONTROLS else job.model
    cfg = run_config(source, job.seed, out, uri)
    if job.model == "untrained":
        return untrained_model(cfg, in_channels=1, image_size=28), cfg
    model, _ = load_model(out / "train" / f"{source}-s{job.seed}" / "checkpoints" / "last.pt")
    return (ShrunkModel(model) if job.model == "shrunk" else model), cfg


def evaluate(job: Job, state: State, out: Path, uri: str, parent: str, max_queries: int | None = None) -> dict:
    """rob28 on the whole test set (eval), the adaptive profile on its query subset, or the eps curve."""
    from rdml import tracking
    from rdml.data import build_datasets
    from rdml.eval.compare import RunEvaluation, adaptive_drop, evaluate_run
    from rdml.eval.robust_checks import robust_curve

    model, cfg = model_for(job, out, uri)
    run_id = child_run(state, job, cfg.model_copy(update={"name": job.model}), parent)
    test = build_datasets(cfg.data).test
    stem = out / "eval" / job.run_key
    if job.kind == "curve":
        eps = [e / 255 for e in CURVE_EPS]
        curve = robust_curve(model, test, CURVE_ATTACK, eps, seed=0, max_queries=max_queries or CURVE_QUERIES,
                             progress=True)
        path = stem.with_name(f"{job.run_key}.curve.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"attack": CURVE_ATTACK, "queries": CURVE_QUERIES,
                                    "curve": {f"{e:.6f}": v for e, v in curve.items()}}, indent=2))
        tracking.log_metrics(run_id, {f"curve.LTM.eps_{round(255 * e)}": v for e, v in curve.items()}, tracking=uri)
        tracking.log_artifact(run_id, path, "robust28", tracking=uri)
        return {"file": str(path)}
    profile = "rob28" if job.kind == "eval" else "rob28-adaptive"
    result = evaluate_run(model, test, profile, name=job.model, seed=job.seed, progress=True, max_queries=max_queries,
                          n_boot=BOOT[0], nmi_boot=BOOT[0] // 5 if job.kind == "eval" else 0)
    prefix = "" if job.kind == "eval" else "adaptive."
    if job.kind == "adaptive":
        base = RunEvaluation.load(stem.with_name(f"{job.run_key}.rob28"))
        drop = adaptive_drop(base, result)
        result.info["drop"] = {k: iv.as_dict() for k, iv in drop.items()}
        result.metrics.update({f"drop.{k}": iv.value for k, iv in drop.items()})
    files = result.save(stem.with_name(f"{job.run_key}.{profile}"))
    tracking.log_metrics(run_id, {prefix + k: v for k, v in result.metrics.items()}, tracking=uri)
    for f in files:
        tracking.log_artifact(run_id, f, "robust28", tracking=uri)
    return {"ers": result.metrics.get("ers"), "file": str(files[0])}


def run_job(job: Job, state: State, out: Path, uri: str, parent: str, max_queries: int | None = None) -> dict:
    if job.kind == "train":
        return train(job, state, out, uri, parent)
    return evaluate(job, state, out, uri, parent, max_queries)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "robust28", help="state, checkpoints, evaluations")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per model (0..N-1)")
    ap.add_argument("--from-seed", type=int, default=0,
                    help="only seeds from this one on (two parts working on one model at once take disjoint seeds)")
    ap.add_argument("--adaptive-seeds", type=int, default=1, help="seeds that get the adaptive profile and the curve")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--only", nargs="+", choices=["train", "eval", "adaptive", "curve", "report"], default=None,
                    help="run only these kinds of job (two parts with disjoint kinds may run at once, one core each)")
    ap.add_argument("--budget-min", type=float, default=None, help="start no job that would end after this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-queries", type=int, default=None,
                    help="attack at most N queries (a quick smoke run only: the results need the whole test set)")
    ap.add_argument("--status", action="store_true", help="print what is done and what is left, then exit")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results-mnist5k.md")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every model (smoke runs of the machinery only)")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples per interval (default 1000)")
    args = ap.parse_args(argv)
    OVERRIDES[:] = args.overrides
    BOOT[0] = args.boot

    import torch

    from rdml.tracking import resolve_uri

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    state = State(args.out / "state.json")
    uri = state.data.get("tracking_uri") or resolve_uri(args.tracking_uri)
    jobs = jobs_for(args.models, list(range(args.from_seed, args.seeds)),
                    [s for s in range(args.adaptive_seeds) if s >= args.from_seed])
    if args.only:
        jobs = [j for j in jobs if j.kind in args.only]
    todo = [j for j in jobs if not state.done(j)]
    if args.status:
        for j in jobs:
            info = state.data["done"].get(j.key)
            status = f"done {info['seconds']:6.0f} s" if info else f"todo (~{state.estimate_min(j):.0f} min)"
            print(f"{j.key:28s} {status}")
        print(f"{len(todo)} of {len(jobs)} jobs left")
        return 0
    parent = ensure_parent(state, uri)
    started, t0, ran = datetime.now(UTC).isoformat(timespec="seconds"), time.perf_counter(), []
    if args.only != ["report"]:
        for job in todo:
            state.reload()
            if state.done(job):  # another part finished it meanwhile
                continue
            if not state.ready(job):
                print(f"{job.key}: waits for the job it needs (train or eval of the same model and seed)")
                continue
            elapsed = (time.perf_counter() - t0) / 60
            if args.budget_min is not None and elapsed + state.estimate_min(job) > args.budget_min:
                print(f"budget: {elapsed:.0f} min used; next job {job.key} (~{state.estimate_min(job):.0f} min) "
                      "would not fit; rerun the same command to continue")
                break
            print(f"[{datetime.now().strftime('%H:%M:%S')}] {job.key} ...", flush=True)
            j0 = time.perf_counter()
            info = run_job(job, state, args.out, uri, parent, args.max_queries)
            state.finish(job, time.perf_counter() - j0, **info)
            ran.append(job.key)
            print(f"[{datetime.now().strftime('%H:%M:%S')}] {job.key} done in {time.perf_counter() - j0:.0f} s",
                  flush=True)
    part = {"started": started, "minutes": round((time.perf_counter() - t0) / 60, 1), "jobs": ran,
            "selection": " ".join(args.only or ["all"]), "threads": args.threads}
    state.update(lambda d: d["parts"].append(part))
    left = [j for j in jobs_for(args.models, list(range(args.seeds)), list(range(args.adaptive_seeds)))
            if not state.done(j)]
    print(f"{sum(not state.done(j) for j in jobs)} job(s) of this selection left")
    if not left or args.only == ["report"]:
        from robust28_report import write_results

        doc = write_results(args.out, state.data, args.doc, uri=uri, parent=parent, models=MODELS, titles=TITLES,
                            controls=CONTROLS, curve=(CURVE_ATTACK, CURVE_EPS, CURVE_QUERIES))
        print(f"wrote {doc}")
    print(f"{len(left)} job(s) left" + ("" if left else "; benchmark complete"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
