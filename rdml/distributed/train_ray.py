"""Single-model data-parallel training on Ray Train (``rdml train``; ``--workers N`` for DDP).

The driver validates everything it can (config, data, tracking) before Ray starts, fixes every path
to an absolute one (Ray workers run in another directory), picks the run directory, and hands each
worker the config and a picklable :class:`rdml.tracking.RunLogger`. Each worker calls the one training
loop, :func:`rdml.train.fit`, with its rank; Ray Train has already created the torch process group
(gloo on CPU, nccl when the workers really see a GPU). Rank 0 evaluates, checkpoints and logs; at the
end every worker calls ``ray.train.report`` once (it is a barrier) and rank 0 attaches a tiny result
directory (``result.json``: final metrics, history, checkpoint path), because Ray Train V2 keeps
metrics only when they come with a checkpoint.

A failure inside a worker that the user can fix (an :class:`~rdml.errors.RdmlError`, e.g.
:class:`~rdml.errors.TrainingDivergedError`) is re-raised on the driver as itself, not as Ray's
``WorkerGroupError``.

Interrupts (``stop``, a :class:`rdml.train.stop.StopSignals`): Ray's own handlers would lose the step
that was running (its SIGTERM handler calls ``sys.exit`` inside ``ray.get``; Ray Train's SIGINT
handler aborts the workers) and the workers never see a Ctrl-C. So ``TorchTrainer.fit`` runs in a
helper thread (Ray Train then installs no SIGINT handler), the main thread owns SIGINT/SIGTERM, and on
the first signal it sets a tiny flag actor that every worker polls (at most twice a second) through
``fit(should_stop=...)``; the workers agree on the step, rank 0 writes a checkpoint of it, every worker
returns, and the driver gets an ordinary result marked ``stopped``. A second signal gives up waiting.

Output: workers train without a tqdm bar (each redraw would be a log line on the driver) and rank 0
prints one line per epoch; Ray Train's own INFO lines and faiss's loader messages are silenced; on a
local Ray the PreemptionWatcher (meaningless on one machine, and it logs a core-worker warning) is off.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rdml.config import ExperimentConfig
from rdml.distributed.connect import connect, resolve_address, scoped_env
from rdml.errors import RdmlError
from rdml.train import TrainResult, default_run_dir, resolve_checkpoint
from rdml.train.stop import StopSignals

RESULT_FILE = "result.json"
#: seconds between two polls of the stop flag by a worker (a poll is one small actor call)
STOP_POLL_S = 0.5


class StopFlag:
    """The driver's stop request, as a Ray actor every worker can read."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def stop_poller(flag: Any, interval_s: float = STOP_POLL_S) -> Callable[[], bool]:
    """A ``should_stop`` for :func:`rdml.train.fit` reading ``flag`` at most every ``interval_s`` seconds."""
    import ray

    state = {"last": 0.0, "stop": False}

    def should_stop() -> bool:
        now = time.monotonic()
        if not state["stop"] and now - state["last"] >= interval_s:
            state["last"] = now
            try:
                state["stop"] = bool(ray.get(flag.is_set.remote(), timeout=30))
            except Exception:  # noqa: BLE001 - an unreachable flag is "no request"; Ray ends the group if the driver died
                pass
        return state["stop"]

    return should_stop


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy of ``cfg`` whose filesystem paths are absolute (workers' CWD is not the driver's)."""
    data = cfg.to_dict()
    data["train"]["output_dir"] = str(Path(cfg.train.output_dir).expanduser().resolve())
    for key in ("root", "manifest_dir"):
        if data["data"].get(key):
            data["data"][key] = str(Path(data["data"][key]).expanduser().resolve())
    if data["model"].get("pretrained"):
        data["model"]["pretrained"] = str(Path(data["model"]["pretrained"]).expanduser().resolve())
    return ExperimentConfig.model_validate(data)


def _worker(config: dict[str, Any]) -> None:
    """The per-worker function Ray Train runs: ``fit`` with this worker's rank, then report once."""
    import ray.train
    import torch

    from rdml.train import fit
    from rdml.train.progress import EpochLine

    # Ray Train sets the worker's root logger to INFO: faiss's "Loading faiss with AVX512 support..." (x3)
    # and Ray's "Reporting training result ..." (a logger named by file path) would reach the driver
    logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    cfg = ExperimentConfig.model_validate(config["cfg"])
    torch.set_num_threads(int(config["threads"]))
    device = "cpu"
    if config["use_cuda"] and torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
    callbacks: list[Any] = []
    if rank == 0:
        callbacks = [EpochLine(cfg.train.epochs)]
        if config.get("logger") is not None:
            callbacks.append(config["logger"])
    flag = config.get("stop_flag")
    result = fit(cfg, callbacks=callbacks, resume=config["resume"], rank=rank, world_size=world_size,
                 device=device, run_dir=config["run_dir"], progress=False,
                 should_stop=stop_poller(flag) if flag is not None else None,
                 checkpoint_extra=config.get("extra") or None)
    if rank != 0:
        ray.train.report({"rank": rank})
        return
    payload = {
        "metrics": result.metrics,
        "history": result.history,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "run_dir": str(result.run_dir) if result.run_dir else None,
        "stopped": result.stopped,
    }
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, RESULT_FILE).write_text(json.dumps(payload))
        ray.train.report({"epoch": result.metrics.get("epoch", 0.0)}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _user_error(exc: BaseException) -> RdmlError | None:
    """The RdmlError a worker raised, dug out of Ray's wrappers (None if it was something else)."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RdmlError):
            return e
        stack.extend(getattr(e, "worker_failures", {}).values())
        stack.extend([getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__, e.__context__])
        as_instance = getattr(e, "as_instanceof_cause", None)
        if callable(as_instance) and type(e).__name__.startswith("RayTaskError"):
            try:
                stack.append(as_instance())
            except Exception:  # noqa: BLE001 - best effort unwrapping
                pass
    return None


def _probe_cuda(ray: Any) -> bool:
    """Do the cluster's GPUs exist for torch? (Logical GPUs on a CPU machine do not.)"""
    if ray.cluster_resources().get("GPU", 0) < 1:
        return False

    @ray.remote(num_gpus=1, num_cpus=0)
    def has_cuda() -> bool:
        import torch

        return torch.cuda.is_available()

    return bool(ray.get(has_cuda.remote(), timeout=120))


def _fit_in_thread(trainer: Any, flag: Any, stop: StopSignals) -> Any:
    """``trainer.fit()`` in a helper thread while the main thread keeps the signals (module docstring)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="rdml-ray-train-fit", daemon=True)
    thread.start()
    forwarded = False
    while thread.is_alive():
        thread.join(0.2)  # a second signal raises Interrupted here (StopSignals)
        if stop.requested and not forwarded:
            flag.set.remote()
            forwarded = True
    if "error" in box:
        raise box["error"]
    return box["result"]


def train_with_ray(
    cfg: ExperimentConfig,
    resume: str | Path | None = None,
    run_id: str | None = None,
    *,
    address: str | None = None,
    run_dir: str | Path | None = None,
    stop: StopSignals | None = None,
    checkpoint_extra: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``cfg`` with ``cfg.train.workers`` Ray Train workers (DDP when > 1) and return the result.

    ``address`` (default ``cfg.ray.address``): join that cluster; None starts a local Ray for this
    call (shut down afterwards) unless this process is already connected to one. ``run_id``: the
    MLflow run the driver created; rank 0 logs to it through :class:`rdml.tracking.RunLogger`.
    ``stop``: the command's signal handlers; a signal then stops the workers after their current step
    with a checkpoint of it (``TrainResult.stopped``); :class:`rdml.train.stop.Interrupted` if the
    signal came before training started. ``checkpoint_extra`` goes into every checkpoint's ``extra``.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = absolute_paths(cfg)
    resume_path = str(resolve_checkpoint(resume).resolve()) if resume is not None else None
    if run_dir is None:
        if resume_path is not None:
            ckpt_parent = Path(resume_path).parent
            run_dir = ckpt_parent.parent if ckpt_parent.name == "checkpoints" else ckpt_parent
        else:
            run_dir = default_run_dir(cfg)
    run_dir = Path(run_dir).resolve()

    logger = None
    if run_id is not None:
        from rdml.tracking import RunLogger

        logger = RunLogger(run_id, cfg.tracking)

    local = resolve_address(cfg, address) is None
    # the dashboard stays on (loopback only): Ray Train V2 polls the state API through it
    started = connect(cfg, address, include_dashboard=True, log_to_driver=True)
    if stop is not None:
        stop.install()  # ray.init replaced the SIGTERM handler with one that calls sys.exit
    try:
        if stop is not None:
            stop.check()
        workers = cfg.train.workers
        use_gpu = cfg.train.device != "cpu" and _probe_cuda(ray)
        if cfg.train.device == "cuda" and not use_gpu:
            raise RdmlError("train.device=cuda but the Ray cluster has no usable GPU; set train.device=auto or cpu")
        if started and local:
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)
        else:
            cpus = 1
        threads = cfg.train.threads or cpus
        flag = ray.remote(num_cpus=0)(StopFlag).remote() if stop is not None else None
        scaling = ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus})
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "cfg": cfg.to_dict(), "resume": resume_path, "run_dir": str(run_dir), "logger": logger,
                "threads": threads, "use_cuda": use_gpu, "extra": dict(checkpoint_extra or {}),
                "stop_flag": flag,
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=scaling,
            run_config=RunConfig(
                name=f"{run_dir.name}",
                storage_path=str(Path(cfg.train.output_dir) / "_ray"),
                failure_config=FailureConfig(max_failures=0),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
                # Ray Train's own INFO lines ("Requesting resources", "Reporting training result ...")
                # are progress chatter next to rdml's epoch lines; warnings and errors still show
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        # on one machine there is nothing to preempt; the watcher only adds a core-worker warning
        quiet = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"} if started and local else {}
        try:
            with scoped_env(**quiet):
                if stop is None:
                    result = trainer.fit()
                else:
                    result = _fit_in_thread(trainer, flag, stop)
        except Exception as exc:
            user = _user_error(exc)
            if user is not None:
                raise user from None
            raise
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train finished without a result (error: {getattr(result, 'error', None)})")
        with result.checkpoint.as_directory() as d:
            payload = json.loads(Path(d, RESULT_FILE).read_text())
        return TrainResult(
            metrics=payload["metrics"],
            checkpoint=Path(payload["checkpoint"]) if payload["checkpoint"] else None,
            history=payload["history"],
            run_dir=Path(payload["run_dir"]) if payload["run_dir"] else run_dir,
            stopped=bool(payload.get("stopped", False)),
        )
    finally:
        if started:
            ray.shutdown()

