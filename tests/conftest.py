"""Shared fixtures: real components only (a local Ray, a real MLflow store or server).

* ``ray_local``: one local Ray for the whole session (ray.init takes seconds), with 4 logical CPUs
  and 3 logical GPUs so placement of GPU actors can be tested on a CPU machine.
* ``mlflow_uri``: a fresh sqlite MLflow store in a temp dir, exported as MLFLOW_TRACKING_URI.
* ``mlflow_server``: a real ``mlflow server`` process on a free loopback port (session scope).
* ``tiny_config``: a digits config small enough to train in seconds.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """rdml's own local Ray (127.0.0.1 only), with 4 logical CPUs and 3 logical GPUs."""
    import ray

    from rdml.config import build_config
    from rdml.distributed.connect import connect

    connect(build_config({"ray": {"num_cpus": 4, "num_gpus": 3}}))
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        raise RuntimeError("mlflow server did not answer /health within 90 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def tiny_config(tmp_path):
    """A digits experiment that trains in a few seconds on 2 CPU cores."""
    from rdml.config import build_config

    return build_config(
        {
            "data": {"name": "digits", "batch_pairs": 16},
            "model": {"arch": "c2f2", "embedding_dim": 32},
            "train": {"epochs": 1, "max_steps_per_epoch": 5, "output_dir": str(tmp_path / "runs"), "seed": 0},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "log_model": False},
        }
    )


# ---- attack-suite fixtures (owner: attacks/robustness) ---------------------------------------------


class TinyEmbedder:
    """Factory for a small conv net with L2-normalised output (fast stand-in for C2F2 in attack tests)."""

    @staticmethod
    def build(dim: int = 32, seed: int = 0):
        import torch
        import torch.nn.functional as F
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = nn.Sequential(
                    nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                    nn.Flatten(), nn.Linear(32 * 7 * 7, dim),
                )
                self.embedding_dim = dim

            def forward(self, x):
                return F.normalize(self.net(x), dim=1)

        torch.manual_seed(seed)
        return Tiny()


@pytest.fixture(scope="session")
def digits_splits():
    """The embedded digits dataset (zero-shot: classes 0-4 train, 5-9 test)."""
    from rdml.config import build_config
    from rdml.data import build_datasets

    return build_datasets(build_config({}).data)


@pytest.fixture(scope="session")
def trained_tiny(digits_splits):
    """A tiny undefended embedder trained for a few seconds on digits (normalised-softmax loss)."""
    import torch
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: 2 contended OpenMP threads are up to 100x slower than 1
    train = digits_splits.train
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.as_tensor(train.labels)
    model = TinyEmbedder.build()
    proxies = torch.nn.Parameter(torch.randn(int(y.max()) + 1, model.embedding_dim, generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.Adam([*model.parameters(), proxies], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), 128):
            idx = perm[s : s + 128]
            logits = model(x[idx]) @ F.normalize(proxies, dim=1).t() / 0.1
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture
def one_thread():
    """Run a test's tiny-tensor attack loops on one torch thread (much faster on a busy 2-core box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
