"""The single-model training loop, in-process: learning, checkpoints, resume, divergence, load_model."""

from __future__ import annotations

import math

import pytest
import torch

from rdml.config import build_config
from rdml.errors import RdmlError, TrainingDivergedError
from rdml.train import (
    CheckpointError,
    fit,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
)
from rdml.train.optim import build_optimizer, build_scheduler
from rdml.train.seeding import derive_seed, rng_state, seed_everything, set_rng_state


class Recorder:
    """A callback that records every hook call (duck-typed: any subset of hooks is allowed)."""

    def __init__(self):
        self.steps, self.epochs, self.checkpoints, self.started, self.result = [], [], [], None, None

    def on_train_start(self, cfg):
        self.started = cfg

    def on_step(self, step, stats):
        self.steps.append((step, dict(stats)))

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append((epoch, dict(metrics)))

    def on_checkpoint(self, path):
        self.checkpoints.append(path)

    def on_train_end(self, result):
        self.result = result


def with_(cfg, **sections):
    """A copy of ``cfg`` with dotted overrides, e.g. with_(cfg, **{"train.epochs": 2})."""
    return build_config(cfg.to_dict(), [f"{k}={v}" for k, v in sections.items()])


def test_fit_learns_writes_checkpoints_and_reports_metrics(tiny_config, tmp_path):
    cfg = with_(tiny_config, **{"train.epochs": 3, "train.max_steps_per_epoch": 6, "train.lr_schedule": "cosine",
                             "train.keep_checkpoints": 2, "data.limit_test": 300})
    rec = Recorder()
    result = fit(cfg, callbacks=[rec], run_dir=tmp_path / "run")

    # the loss goes down: first steps vs last steps (per-step stats reach the callback)
    losses = [s["loss"] for _, s in rec.steps]
    assert len(losses) == 18 and [st for st, _ in rec.steps] == list(range(1, 19))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 * 0.7, losses

    # epoch metrics: averaged defense stats, cost, time, lr schedule, evaluation each epoch
    assert [e for e, _ in rec.epochs] == [1, 2, 3]
    for _, m in rec.epochs:
        assert {"train/loss", "train/passes_per_iter", "train/epoch_time_s", "eval/recall@1", "eval/nmi"} <= set(m)
        assert m["train/passes_per_iter"] == 1.0 and m["train/epoch_time_s"] > 0
    lrs = [m["train/lr"] for _, m in rec.epochs]
    assert lrs[0] > lrs[1] > lrs[2] >= 0  # cosine
    # 5 unseen digit classes: chance R@1 is ~0.2. (An untrained c2f2 already scores ~0.98 on upsampled
    # 8x8 digits, so this guards the eval pipeline; learning is shown by the loss above.)
    assert result.metrics["eval/recall@1"] > 0.6, result.metrics
    assert result.metrics == rec.epochs[-1][1] and result.history == [m for _, m in rec.epochs]

    ckdir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["epoch-0002.pt", "epoch-0003.pt", "last.pt"]  # pruned
    assert result.checkpoint == ckdir / "last.pt" and rec.checkpoints[-1] == ckdir / "epoch-0003.pt"
    assert rec.result is result and rec.started == cfg

    ckpt = load_checkpoint(tmp_path / "run")  # a run directory resolves to its last.pt
    assert ckpt.epoch == 3 and ckpt.global_step == 18 and ckpt.config == cfg
    assert ckpt.metrics == result.metrics and len(ckpt.history) == 3
    assert ckpt.optimizer_state is not None and ckpt.scheduler_state is not None and ckpt.rng_state is not None


def test_resume_equals_uninterrupted_run(tiny_config, tmp_path):
    cfg2 = with_(tiny_config, **{"train.epochs": 2, "train.max_steps_per_epoch": 4, "train.lr_schedule": "step",
                                 "train.lr_step_epochs": 1, "train.eval_every": 0, "data.limit_test": 300})
    straight = fit(cfg2, run_dir=tmp_path / "straight")

    first = fit(with_(cfg2, **{"train.epochs": 1}), run_dir=tmp_path / "split")
    assert load_checkpoint(first.checkpoint).epoch == 1
    resumed = fit(cfg2, resume=tmp_path / "split")  # continues in the same run directory
    assert resumed.run_dir == tmp_path / "split"
    assert (tmp_path / "split" / "checkpoints" / "epoch-0002.pt").exists()

    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a.epoch == b.epoch == 2 and a.global_step == b.global_step == 8
    for key, tensor in a.model_state.items():
        assert torch.equal(tensor, b.model_state[key]), key
    drop_time = [k for k in straight.metrics if k != "train/epoch_time_s"]
    assert {k: straight.metrics[k] for k in drop_time} == {k: resumed.metrics[k] for k in drop_time}
    assert len(resumed.history) == 2 and resumed.history[0]["epoch"] == 1


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    run = tmp_path / "run"
    tiny_config = with_(tiny_config, **{"data.limit_test": 300})
    good = fit(tiny_config, run_dir=run)
    last = run / "checkpoints" / "last.pt"
    before = last.read_bytes()

    # Resuming with an absurd lr is a real trigger: Adam moves every weight by ~lr, so the next
    # forward pass overflows float32 to inf and the normalised embedding (hence the loss) is NaN.
    bad = with_(tiny_config, **{"train.epochs": 3, "train.lr": 1e30})
    with pytest.raises(TrainingDivergedError) as info:
        fit(bad, resume=run)
    msg = str(info.value)
    assert "epoch 2" in msg and "step" in msg and "train.lr" in msg and "grad_clip" in msg and str(last) in msg
    assert isinstance(info.value, RdmlError)
    assert last.read_bytes() == before  # never overwritten by a bad state
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001.pt", "last.pt"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]

    # the fix the message proposes works: resume from the kept checkpoint with a sane lr
    fixed = fit(with_(tiny_config, **{"train.epochs": 2, "train.lr": 5e-4}), resume=run)
    assert load_checkpoint(fixed.checkpoint).epoch == 2 and math.isfinite(fixed.metrics["train/loss"])
    assert good.metrics["epoch"] == 1


def test_load_model_from_checkpoint_alone_reproduces_metrics(tiny_config, tmp_path):
    from rdml.data import build_datasets
    from rdml.eval import evaluate_model

    result = fit(tiny_config, run_dir=tmp_path / "run")
    model, cfg = load_model(result.checkpoint)
    assert cfg == tiny_config and not model.training
    test = build_datasets(cfg.data).test
    metrics = evaluate_model(model, test, cfg.data.eval_batch_size, "cpu", seed=cfg.eval.kmeans_seed)
    for key, value in metrics.items():
        assert value == pytest.approx(result.metrics[f"eval/{key}"], abs=1e-6), key


def test_checkpoint_path_errors_name_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="run directory"):
        resolve_checkpoint(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(junk)


def test_optimizer_gives_proxies_their_own_faster_group(tiny_config):
    from rdml.losses import build_loss
    from rdml.models import build_model

    cfg = with_(tiny_config, **{"loss.name": "proxy_anchor", "loss.proxy_lr_multiplier": 100, "train.optimizer": "adamw"})
    model = build_model(cfg.model, in_channels=1, image_size=28)
    loss = build_loss(cfg.loss, num_classes=5, embedding_dim=cfg.model.embedding_dim)
    opt = build_optimizer(cfg, model, loss)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-1])
    assert build_scheduler(cfg, opt) is None


def test_seeding_is_stable_and_rng_state_round_trips():
    assert derive_seed(0, 1, 0) == derive_seed(0, 1, 0)
    assert len({derive_seed(0, e, r) for e in range(5) for r in range(3)}) == 15
    seed_everything(3)
    state = rng_state()
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    set_rng_state(state)
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
