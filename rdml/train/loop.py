"""The one training loop for one model (no Ray in here: Ray Train, Tune and tests call :func:`fit`).

Per epoch: reseed from ``(seed, epoch, rank)``, build the epoch's deterministic train loader, run
``defense.step`` on every batch (``defense.name=none`` is regular training), back-propagate, clip,
step; check the loss for NaN/inf every step; average the defense's per-step statistics; evaluate on
the test split every ``train.eval_every`` epochs (rank 0 only) and checkpoint every
``train.checkpoint_every`` epochs (rank 0 only). The last epoch is always evaluated and checkpointed.

Stopping (``should_stop``, e.g. :class:`rdml.train.stop.StopSignals` on SIGINT/SIGTERM): the flag is
checked between steps (all ranks agree through one all-reduce, so no rank is left waiting in a
collective); the loop then writes ``epoch-EEEE-step-SSSSSS.pt`` (and ``last.pt``) holding the state after
the last finished step, and returns a result with ``stopped=True``. Such a checkpoint records the last
*finished* epoch as its ``epoch`` and the position inside the next one under ``extra["partial_epoch"]``
(steps done, the running sums of the step statistics, the epoch's elapsed time, and every rank's RNG
states); resuming from it rebuilds that epoch's loader, skips the finished batches without loading
them, restores the RNG states and continues, so "stopped at step k + resumed" equals an uninterrupted
run (for DDP, when resumed with the same number of workers). Nothing is written when no step finished
since the last checkpoint.

Data parallel (``world_size > 1``): the caller (Ray Train) has created the process group. The model is
wrapped in ``DistributedDataParallel``, each rank reads its own shard of every epoch, and all ranks run
the same number of steps (the minimum over ranks). The defense receives the DDP wrapper; it must run
its PGD inner maximisation on ``model.module`` (:func:`rdml.train.checkpoint.unwrap`), because DDP's
forward hooks and buffer broadcasts are collectives, and attacks that stop early on one rank only would
otherwise deadlock the group. Only the outer (update) forward goes through the wrapper, so gradients
are averaged once per step. (Measured: with ``forward_sync_buffers=False``, which the loop sets, PGD
through the wrapper also works with gloo, even with different PGD iteration counts per rank, because
frozen parameters register no gradient hooks; unwrapping is still the safe rule.)
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rdml.config import ExperimentConfig
from rdml.errors import ConfigError, TrainingDivergedError
from rdml.train.callbacks import CallbackList
from rdml.train.checkpoint import LAST, load_checkpoint, prune_checkpoints, save_checkpoint, unwrap
from rdml.train.optim import build_optimizer, build_scheduler, rescale_lr
from rdml.train.seeding import derive_seed, rng_state, seed_everything, set_rng_state


@dataclass
class TrainResult:
    """What a finished run returns: the final epoch's metrics, the last checkpoint, per-epoch history."""

    metrics: dict[str, float]
    checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    run_dir: Path | None = None
    #: True when ``should_stop`` ended training early; ``checkpoint`` then resumes where it stopped
    stopped: bool = False


#: key of :attr:`rdml.train.Checkpoint.extra` holding the position inside an unfinished epoch
PARTIAL = "partial_epoch"
DEVICE_CHOICES = "cpu, cuda, cuda:N, mps or auto"


def _torch_build() -> str:
    cuda = getattr(torch.version, "cuda", None)
    return f"torch {torch.__version__}, " + (f"built for CUDA {cuda}" if cuda else "a CPU-only build")


def _requested_device(device: str | torch.device) -> torch.device:
    """An explicitly requested device (``--device``), checked against what this torch can use."""
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device).strip())
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {str(device)!r} is not a device torch knows; use one of {DEVICE_CHOICES} "
                          "(e.g. --device cpu)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r} was requested but torch sees no CUDA device here "
                              f"({_torch_build()}); use --device cpu, or --device auto (CUDA when present, else CPU)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {str(device)!r} does not exist: torch sees {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1}; pick one of them (or --device cuda)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device {str(device)!r} was requested but torch has no MPS backend here "
                              f"({_torch_build()}); use --device cpu or --device auto")
    elif dev.type != "cpu":
        raise ConfigError(f"device {str(device)!r} is not supported by rdml; use one of {DEVICE_CHOICES}")
    return dev


def resolve_device(cfg: ExperimentConfig, device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (``auto`` allowed), else ``train.device`` (``auto``: CUDA when present, else CPU).

    A device this torch cannot use (``cuda`` on a CPU machine or a CPU-only build, ``cuda:3`` on a
    one-GPU machine, a misspelling) is a :class:`ConfigError` that names the fix, not a traceback
    from the first tensor moved there.
    """
    if device is not None and str(device).strip() != "auto":
        return _requested_device(device)
    if device is None and cfg.train.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device=cuda but torch sees no CUDA device ({_torch_build()}); "
                              "set train.device=auto or cpu")
        return torch.device("cuda")
    if (device is not None or cfg.train.device == "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def default_run_dir(cfg: ExperimentConfig) -> Path:
    """``<train.output_dir>/<tracking.run_name or name-timestamp>``."""
    name = cfg.tracking.run_name or f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    base = Path(cfg.train.output_dir) / name
    path, n = base, 1
    while path.exists():  # never mix two runs' checkpoints
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_reduce(value: torch.Tensor, op: str) -> torch.Tensor:
    dist = _dist()
    if dist is None:
        return value
    dist.all_reduce(value, op=getattr(dist.ReduceOp, op))
    return value


def _broadcast_object(obj: Any, world_size: int) -> Any:
    dist = _dist()
    if dist is None or world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_object(obj: Any, world_size: int) -> list[Any]:
    dist = _dist()
    if dist is None or world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _stop_agreed(should_stop: Callable[[], bool], device: torch.device, world_size: int) -> bool:
    """Did any rank's ``should_stop`` fire? (Every rank calls this once per step: one tiny all-reduce.)"""
    local = bool(should_stop())
    if world_size == 1:
        return local
    return bool(_all_reduce(torch.tensor(int(local), device=device), "MAX").item())


def _progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    disabled = not enabled or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    return tqdm(total=total, initial=initial, desc=desc, disable=disabled, leave=False, dynamic_ncols=True)


class _DropFromScratch(logging.Filter):
    """Drops the ResNet "training from scratch" warning where the weights are loaded right after
    (resume) or where another rank already said it (rank > 0)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "training from scratch" not in record.getMessage()


def _evaluate(model: nn.Module, splits: Any, cfg: ExperimentConfig, device: torch.device) -> dict[str, float]:
    """Benign metrics under the evaluation protocol (:func:`rdml.eval.evaluation_sets`: In-Shop's queries
    against its gallery, else the whole zero-shot test split)."""
    from rdml import eval as rdml_eval

    queries, gallery = rdml_eval.evaluation_sets(splits)
    plain = unwrap(model)
    was_training = plain.training
    plain.eval()
    try:
        metrics = rdml_eval.evaluate_model(
            plain, queries, cfg.data.eval_batch_size, device, seed=cfg.eval.kmeans_seed, gallery=gallery
        )
    finally:
        plain.train(was_training)
    return {f"eval/{k}": float(v) for k, v in metrics.items()}


def _average_grads(params: list[torch.Tensor], world_size: int) -> None:
    for p in params:  # every rank must join every all-reduce, with or without a gradient
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        _all_reduce(p.grad, "SUM").div_(world_size)


def _params_finite(*modules: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def _diverged(epoch: int, step: int, global_step: int, what: str, cfg: ExperimentConfig, last_good: Path | None):
    kept = f"the last good checkpoint is kept: {last_good}" if last_good else "no checkpoint had been written yet"
    resume = f" and resume with `rdml train --resume {last_good} --set train.lr=...`" if last_good else ""
    return TrainingDivergedError(
        f"training diverged at epoch {epoch}, step {step} (global step {global_step}): {what}; {kept}. "
        f"Fix: lower train.lr (now {cfg.train.lr:g}), enable gradient clipping (--set train.grad_clip=1.0), "
        f"or check the data for corrupt or constant images{resume}."
    )


def fit(
    cfg: ExperimentConfig,
    callbacks: Sequence[object] = (),
    resume: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
    *,
    run_dir: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_extra: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train one model as configured and return its final metrics, checkpoint and history.

    ``resume``: a checkpoint file or run directory (-> ``checkpoints/last.pt``); training continues
    where the checkpoint left off (the next epoch, or inside an epoch for a checkpoint written on a
    stop) in that run directory with every state restored, so the result equals an uninterrupted run.
    A different ``train.lr`` than the checkpoint's takes effect (e.g. lower it after a
    :class:`TrainingDivergedError`); the model section must match the checkpoint's.
    ``run_dir``: where checkpoints go (default: ``<train.output_dir>/<run name or timestamp>``; DDP
    callers pass the same directory to every rank). Only rank 0 evaluates, checkpoints and calls
    ``on_checkpoint``; every rank calls the other hooks with the same (rank-0) epoch metrics.
    ``should_stop``: polled between steps (on every rank, cheaply); when it returns True the loop writes
    a checkpoint of the current state and returns ``TrainResult(stopped=True)`` without ``on_train_end``.
    ``checkpoint_extra``: stored in every checkpoint's ``extra`` (e.g. the MLflow run id, so that a
    resume continues the same run); a resumed checkpoint's own extra values are kept otherwise.
    ``progress``: show a per-step tqdm bar on rank 0 (Ray workers turn it off: their output is a log).
    """
    from rdml.data import build_datasets, make_train_loader
    from rdml.defenses import build_defense
    from rdml.defenses.base import StepState
    from rdml.losses import build_loss
    from rdml.models import build_model

    tc = cfg.train
    is_main = rank == 0
    cbs = CallbackList(callbacks)
    device = resolve_device(cfg, device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if world_size > 1 and _dist() is None:
        raise RuntimeError("fit(world_size>1) needs an initialised torch.distributed process group (Ray Train)")

    ckpt = load_checkpoint(resume) if resume is not None else None
    partial: dict[str, Any] | None = None
    extra: dict[str, Any] = {}
    if ckpt is not None:
        if ckpt.config.model != cfg.model or ckpt.config.data.name != cfg.data.name:
            raise ConfigError(
                f"cannot resume {ckpt.path}: its model/data config differs from this run's "
                f"(checkpoint: model={ckpt.config.model.model_dump(mode='json')}, data.name={ckpt.config.data.name}); "
                "resume with the checkpoint's own config (`rdml train --resume PATH` without --config)"
            )
        if run_dir is None:
            run_dir = ckpt.path.parent.parent if ckpt.path.parent.name == "checkpoints" else ckpt.path.parent
        extra = {k: v for k, v in ckpt.extra.items() if k != PARTIAL}
        partial = ckpt.extra.get(PARTIAL)
        if partial is not None and int(partial.get("epoch", -1)) != ckpt.epoch + 1:
            partial = None
    extra.update(checkpoint_extra or {})
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    ckpt_dir = run_dir / "checkpoints"

    seed_everything(derive_seed(tc.seed))  # same initial weights (and proxies) on every rank
    splits = build_datasets(cfg.data)
    train_set = splits.train
    quiet = _DropFromScratch()
    resnet_log = logging.getLogger("rdml.models.resnet")
    if ckpt is not None or not is_main:
        resnet_log.addFilter(quiet)
    try:
        model = build_model(cfg.model, in_channels=train_set.in_channels, image_size=train_set.image_size).to(device)
    finally:
        resnet_log.removeFilter(quiet)
    loss_fn = build_loss(cfg.loss, num_classes=train_set.num_classes, embedding_dim=model.embedding_dim).to(device)
    defense = build_defense(cfg.defense, cfg.loss, loss_fn)
    optimizer = build_optimizer(cfg, model, loss_fn)
    scheduler = build_scheduler(cfg, optimizer)

    start_epoch, global_step = 1, 0
    history: list[dict[str, float]] = []
    last_good: Path | None = None
    saved_step = 0  # global step of the newest checkpoint (0: nothing trained, nothing to keep)
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
        if ckpt.loss_state is not None:
            loss_fn.load_state_dict(ckpt.loss_state)
        if ckpt.optimizer_state is not None:
            optimizer.load_state_dict(ckpt.optimizer_state)
        if scheduler is not None and ckpt.scheduler_state is not None:
            scheduler.load_state_dict(ckpt.scheduler_state)
        if ckpt.defense_state is not None:
            defense.load_state_dict(ckpt.defense_state)
        if ckpt.config.train.lr != tc.lr:
            rescale_lr(optimizer, scheduler, tc.lr / ckpt.config.train.lr)
        if ckpt.rng_state is not None and world_size == 1:
            set_rng_state(ckpt.rng_state)
        start_epoch, global_step = ckpt.epoch + 1, ckpt.global_step
        history = list(ckpt.history)
        last_good = ckpt.path
        saved_step = global_step

    train_model: nn.Module = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        # no buffer broadcast: it is a collective inside forward, and PGD runs a rank-dependent number
        # of forwards (early stop); BN statistics stay per rank, rank 0's are checkpointed
        train_model = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)

    def save(path: Path, epoch: int, metrics: dict[str, float], rng: dict[str, Any], more: dict[str, Any]) -> Path:
        return save_checkpoint(
            path, cfg=cfg, model=model, in_channels=train_set.in_channels, image_size=train_set.image_size,
            epoch=epoch, global_step=global_step, optimizer=optimizer, scheduler=scheduler, defense=defense,
            loss=loss_fn, metrics=metrics, history=history, rng_state=rng, extra={**extra, **more},
        )

    params = [p for group in optimizer.param_groups for p in group["params"]]
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    cbs.on_train_start(cfg)
    metrics: dict[str, float] = dict(history[-1]) if history else {}
    stopped = False
    model.train()
    for epoch in range(start_epoch, tc.epochs + 1):
        idx = epoch - 1  # 0-based epoch index for loaders and StepState
        seed_everything(derive_seed(tc.seed, idx, rank))
        # a CPU generator: mining and PGD random starts draw on CPU
        generator = torch.Generator().manual_seed(derive_seed(tc.seed, idx, rank, 1))
        part = partial if (partial is not None and epoch == start_epoch) else None
        done = int(part["steps_done"]) if part is not None else 0
        loader = make_train_loader(train_set, cfg.data, seed=tc.seed, epoch=idx, rank=rank, world_size=world_size,
                                   skip=done)
        full = len(loader) + done
        n_steps = full if tc.max_steps_per_epoch is None else min(full, tc.max_steps_per_epoch)
        n_steps = int(_all_reduce(torch.tensor(n_steps, device=device), "MIN").item())
        sums: dict[str, float] = defaultdict(float)
        it = iter(loader)  # creating the iterator draws from the global torch RNG: restore states after it
        elapsed = 0.0
        if part is not None:
            sums.update({k: float(v) for k, v in part.get("sums", {}).items()})
            elapsed = float(part.get("elapsed_s", 0.0))
            states = part.get("rng") or []
            if len(states) == world_size:  # same number of ranks as when it stopped: exact continuation
                set_rng_state(states[rank]["global"])
                generator.set_state(states[rank]["generator"])
        t0 = time.perf_counter() - elapsed
        bar = _progress_bar(n_steps, f"epoch {epoch}/{tc.epochs}", enabled=is_main and progress, initial=done)
        step = done
        for step in range(done + 1, n_steps + 1):
            if should_stop is not None and _stop_agreed(should_stop, device, world_size):
                stopped = True
                step -= 1  # the steps finished in this epoch
                break
            images, labels, _ = next(it)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            state = StepState(
                step=global_step, epoch=idx, progress=(idx + (step - 1) / n_steps) / max(tc.epochs, 1),
                generator=generator,
            )
            out = defense.step(train_model, images, labels, state)
            loss_value = _all_reduce(out.loss.detach().clone(), "SUM") / world_size
            if not bool(torch.isfinite(loss_value)):
                bar.close()
                raise _diverged(epoch, step, global_step + 1, f"the loss is {float(loss_value)}", cfg, last_good)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if world_size > 1:
                _average_grads(loss_params, world_size)  # DDP averages the model's; proxies live outside it
            if tc.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            optimizer.step()
            global_step += 1
            stats = {**{k: float(v) for k, v in out.stats.items()}, "loss": float(loss_value), "passes": float(out.passes)}
            for k, v in stats.items():
                sums[k] += v
            cbs.on_step(global_step, stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}")
        bar.close()
        if stopped:
            if global_step != saved_step:  # something was trained since the last checkpoint: keep it
                rngs = _gather_object({"global": rng_state(), "generator": generator.get_state()}, world_size)
                if is_main:
                    position = {"epoch": epoch, "steps_done": step, "steps": n_steps, "sums": dict(sums),
                                "elapsed_s": time.perf_counter() - t0, "world_size": world_size, "rng": rngs}
                    last_good = save(ckpt_dir / f"epoch-{epoch:04d}-step-{step:06d}.pt", epoch - 1,
                                     dict(history[-1]) if history else {}, rngs[0]["global"], {PARTIAL: position})
                    prune_checkpoints(ckpt_dir, tc.keep_checkpoints)
                    cbs.on_checkpoint(last_good)
            break
        if scheduler is not None:
            scheduler.step()

        last = epoch == tc.epochs
        metrics = {f"train/{k}": v / max(n_steps, 1) for k, v in sums.items()}
        metrics["train/passes_per_iter"] = metrics.pop("train/passes", 0.0)
        metrics["train/epoch_time_s"] = time.perf_counter() - t0
        metrics["train/lr"] = float(optimizer.param_groups[0]["lr"])
        metrics["train/steps"] = float(n_steps)
        metrics["epoch"] = float(epoch)
        if not _params_finite(model, loss_fn):
            raise _diverged(epoch, n_steps, global_step, "the weights contain NaN/inf", cfg, last_good)
        if is_main and (last or (tc.eval_every > 0 and epoch % tc.eval_every == 0)):
            metrics.update(_evaluate(model, splits, cfg, device))
        metrics = _broadcast_object(metrics, world_size)
        history.append(metrics)
        if last or epoch % tc.checkpoint_every == 0:
            if is_main:
                last_good = save(ckpt_dir / f"epoch-{epoch:04d}.pt", epoch, metrics, rng_state(), {})
                prune_checkpoints(ckpt_dir, tc.keep_checkpoints)
                cbs.on_checkpoint(last_good)
            saved_step = global_step
        cbs.on_epoch_end(epoch, metrics)

    if stopped:
        for cb in cbs.callbacks:  # send what is buffered (step curves); no final artifacts on a stop
            flush = getattr(cb, "flush", None)
            if callable(flush):
                flush()
        checkpoint = (ckpt_dir / LAST) if (ckpt_dir / LAST).exists() else last_good
        metrics = dict(history[-1]) if history else {}
        return TrainResult(metrics=metrics, checkpoint=checkpoint, history=history, run_dir=run_dir, stopped=True)

    if start_epoch > tc.epochs and not history:
        # nothing to train (a checkpoint of epoch 0): evaluate the model so the run still reports metrics
        if is_main:
            metrics = {"epoch": float(start_epoch - 1), **_evaluate(model, splits, cfg, device)}
            history.append(metrics)
            last_good = save(ckpt_dir / f"epoch-{start_epoch - 1:04d}.pt", start_epoch - 1, metrics, rng_state(), {})
        metrics = _broadcast_object(metrics, world_size)

    checkpoint = (ckpt_dir / LAST) if (ckpt_dir / LAST).exists() else last_good
    result = TrainResult(metrics=metrics, checkpoint=checkpoint, history=history, run_dir=run_dir)
    cbs.on_train_end(result)
    return result
