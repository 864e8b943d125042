"""train_with_ray on the session Ray (4 CPUs, 3 *logical* GPUs): CPU fallback, results, user errors."""

from __future__ import annotations

import pytest

from rdml.config import build_config
from rdml.errors import TrainingDivergedError
from rdml.train import load_checkpoint


@pytest.mark.slow
def test_train_with_ray_returns_result_and_reraises_user_errors(ray_local, tiny_config, tmp_path):
    from rdml.distributed.train_ray import train_with_ray

    # logical GPUs exist but torch sees no CUDA: the probe falls back to CPU workers over gloo
    cfg = build_config(tiny_config.to_dict(), ["train.workers=2", "data.limit_test=200"])
    result = train_with_ray(cfg, run_dir=tmp_path / "run")
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.epoch == 1 and ckpt.metrics == result.metrics and len(result.history) == 1
    assert 0.2 < result.metrics["eval/recall@1"] <= 1.0
    assert ray_local.is_initialized()  # a Ray it did not start is left running

    # a worker's TrainingDivergedError reaches the driver as itself (not Ray's WorkerGroupError)
    bad = build_config(cfg.to_dict(), ["train.epochs=2", "train.lr=1e30", "train.workers=1"])
    with pytest.raises(TrainingDivergedError, match="epoch 2"):
        train_with_ray(bad, resume=tmp_path / "run")
    assert load_checkpoint(tmp_path / "run").epoch == 1


def _ddp_rank(rank: int, out_dir: str, port: int) -> None:
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TQDM_DISABLE="1")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        import torch

        from rdml.train import fit

        torch.set_num_threads(1)
        cfg = build_config({
            "data": {"batch_pairs": 8, "limit_test": 200}, "model": {"embedding_dim": 16},
            "loss": {"name": "proxy_anchor"}, "train": {"epochs": 1, "max_steps_per_epoch": 3, "output_dir": out_dir},
        })
        result = fit(cfg, rank=rank, world_size=2, run_dir=f"{out_dir}/run")
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result.metrics, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fit_data_parallel_two_ranks_without_ray(tmp_path):
    """The DDP path of fit itself (process group made here, as Ray Train would): proxies stay in sync."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_rank, args=(str(tmp_path), port), nprocs=2)
    m0, m1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert m0 == m1 and m0["train/steps"] == 3.0 and "eval/recall@1" in m0  # rank 0's eval reaches all ranks
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.epoch == 1 and "_loss.proxies" in "".join(ckpt.loss_state)
