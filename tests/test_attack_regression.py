"""Bit-for-bit regression of the self-query robustness path (queries = the test set, own row excluded).

Long benchmarks compare numbers computed months apart, so a refactor of the attack code must not move a
single bit of them. This test runs :func:`rdml.eval.robustness.evaluate_robustness` on a fixed, seeded
tiny model and data set with

* the ``rob28`` profile (all ten ERS attacks, 3 PGD steps) plus Panum's query attack (random start);
* ``rob28-adaptive`` cut down to 3 steps and 2 restarts (random restarts, the ``2eps/`` ERS group, a
  seeded query subset);
* ``clustering28`` cut down to 3 steps (every clustering attack, faiss k-means included);
* :func:`rdml.eval.compare.evaluate_run` (benign metrics and bootstrap intervals next to the attacks);

and compares every per-query value, PGD iteration count, pass count, attack target, example retrieval
and flat metric with the reference arrays in ``tests/data/attack_regression.npz``, exactly.

The references were captured from the code *before* the attack objects of issue 12 existed. Recapture
(``python tests/test_attack_regression.py``) only when a change of the numbers is intended, and say so.
The model runs on one torch thread, so the float summation order is fixed; the references were taken
on x86-64 with torch 2.13 CPU.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

REFERENCE = Path(__file__).parent / "data" / "attack_regression.npz"
ROB28 = ["CA:pm=+:W=1", "CA:pm=-:W=1", "QA:pm=+:M=1", "QA:pm=-:M=1", "TMA", "ES", "LTM", "GTM", "GTT"]


class Images(Dataset):
    """48 seeded 1x8x8 'images' in [0,1], 6 classes (rdml's dataset protocol: image, label, index)."""

    def __init__(self, n: int = 48, classes: int = 6) -> None:
        g = torch.Generator().manual_seed(12)
        self.labels = np.arange(n) % classes
        centres = torch.rand(classes, 1, 8, 8, generator=g)
        self.x = (centres[self.labels] + 0.2 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.labels[i]), i


class Net(nn.Module):
    """A tiny conv embedder with L2-normalised output, initialised from a fixed seed."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            self.conv = nn.Conv2d(1, 8, 3, 2, 1)
            self.fc = nn.Linear(8 * 4 * 4, 16)

    def forward(self, x):
        return F.normalize(self.fc(torch.relu(self.conv(x)).flatten(1)), dim=1)


def _digest(t) -> np.ndarray:
    data = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
    return np.frombuffer(hashlib.sha256(data.tobytes()).digest(), dtype=np.uint8)


def _flat(prefix: str, metrics) -> dict[str, np.ndarray]:
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
    return {f"{prefix}/metric_keys": np.asarray(keys), f"{prefix}/metric_values": np.asarray([float(metrics[k]) for k in keys])}


def _targets(outcome) -> np.ndarray | None:
    return getattr(outcome, "targets", None)


def _robustness_arrays(prefix: str, res) -> dict[str, np.ndarray]:
    out = _flat(prefix, res)
    out[f"{prefix}/indices"] = res.indices
    out[f"{prefix}/clean_correct"] = res.clean_correct
    out[f"{prefix}/spread"] = np.asarray(res.spread)
    for o in res.outcomes:
        for name, v in o.values.items():
            out[f"{prefix}/values/{name}"] = v
        out[f"{prefix}/iterations/{o.key}"] = o.iterations
        out[f"{prefix}/passes/{o.key}"] = np.asarray([o.passes, *np.asarray(o.batch_passes).ravel()])
        if _targets(o) is not None:
            out[f"{prefix}/targets/{o.key}"] = _targets(o)
    for name, v in res.per_query_metrics().items():
        out[f"{prefix}/per_query/{name}"] = v
    if res.examples is not None:
        for name in ("index", "clean_topk", "adv_topk", "labels"):
            out[f"{prefix}/examples/{name}"] = res.examples[name].numpy()
        out[f"{prefix}/examples/adv_digest"] = _digest(res.examples["adv"])
    for o in res.clustering:
        out[f"{prefix}/clustering/{o.key}"] = _digest(o.adv_emb)
        out[f"{prefix}/clustering_passes/{o.key}"] = np.asarray(o.passes)
    return out


def _profiles():
    from rdml.attacks.profiles import AttackProfile, load_profile, profile_from_dict

    main = profile_from_dict({"name": "reg", "ers": True, "budget": {"eps": "77/255", "alpha": "12/255", "steps": 3},
                              "attacks": [*ROB28, "PANUM:eps=0.01:alpha=0.004:pgditer=5:rs=1"]})
    adaptive = load_profile("rob28-adaptive")
    adaptive = AttackProfile(name="reg-adaptive", ers=True, max_queries=20, attacks=tuple(
        s.model_copy(update={"steps": min(s.steps, 3), "restarts": min(s.restarts, 2)}) for s in adaptive.attacks))
    clustering = load_profile("clustering28")
    clustering = AttackProfile(name="reg-clustering", attacks=tuple(
        s.model_copy(update={"steps": 3, "alpha": 12 / 255}) for s in clustering.attacks))
    return main, adaptive, clustering


def compute() -> dict[str, np.ndarray]:
    """Every number the regression watches, from the code as it is now (one torch thread)."""
    from rdml.eval.compare import evaluate_run
    from rdml.eval.robust_checks import robust_curve
    from rdml.eval.robustness import evaluate_robustness

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, data = Net().eval(), Images()
        main, adaptive, clustering = _profiles()
        out: dict[str, np.ndarray] = {}
        res = evaluate_robustness(model, data, main, batch_size=16, progress=False, keep_examples=3, intervals=30)
        out.update(_robustness_arrays("main", res))
        res = evaluate_robustness(model, data, adaptive, seed=1, batch_size=8, progress=False, intervals=20)
        out.update(_robustness_arrays("adaptive", res))
        res = evaluate_robustness(model, data, clustering, batch_size=16, progress=False)
        out.update(_robustness_arrays("clustering", res))
        run = evaluate_run(model, data, main, name="reg", batch_size=16, n_boot=20, nmi_boot=4)
        out.update(_flat("run", run.metrics))
        for name, v in run.attack_per_query.items():
            out[f"run/attack_per_query/{name}"] = v
        curve = robust_curve(model, data, "LTM:eps=77/255:alpha=12/255:pgditer=3", [0.0, 16 / 255, 77 / 255],
                             max_queries=24, batch_size=16, progress=False)
        out["curve/eps"], out["curve/values"] = np.asarray(list(curve)), np.asarray(list(curve.values()))
        return out
    finally:
        torch.set_num_threads(threads)


def pack(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Many small arrays as a few flat ones (one zip entry each keeps the file at a few KB)."""
    names = sorted(arrays)
    kinds = {"f": np.float64, "i": np.int64, "u": np.int64, "b": np.int64, "U": str}
    out: dict[str, list] = {"f": [], "i": [], "U": []}
    index = []
    for name in names:
        a = np.asarray(arrays[name])
        kind = "f" if a.dtype.kind == "f" else "U" if a.dtype.kind == "U" else "i"
        flat = a.ravel().astype(kinds[a.dtype.kind])
        index.append((name, kind, str(a.dtype), ",".join(map(str, a.shape)), sum(len(x) for x in out[kind]), flat.size))
        out[kind].append(flat)
    packed = {f"data_{k}": np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    packed["index"] = np.asarray([[str(x) for x in row] for row in index])
    return packed


def unpack(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, kind, dtype, shape, start, size in packed["index"].tolist():
        flat = packed[f"data_{kind}"][int(start) : int(start) + int(size)]
        dims = tuple(int(d) for d in shape.split(",") if d)
        out[name] = flat.astype(dtype).reshape(dims)
    return out


@pytest.fixture(scope="module")
def computed() -> dict[str, np.ndarray]:
    return compute()


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE, allow_pickle=False) as z:
        return unpack({k: z[k] for k in z.files})


def test_the_reference_covers_every_attack(reference):
    """Guard: the file holds what the comparison below needs (a test comparing nothing cannot fail)."""
    for key in ("CA+", "CA-", "QA+", "QA-", "TMA", "ES:D", "ES:R", "LTM", "GTM", "GTT", "PANUM", "PANUM:clean",
                "2eps/CA+", "2eps/GTT"):
        prefix = "adaptive" if key.startswith("2eps/") else "main"
        assert f"{prefix}/values/{key}" in reference, key
    for key in ("CA+", "CA-", "QA+", "QA-", "TMA", "GTM", "GTT", "PANUM"):
        assert f"main/targets/{key}" in reference, key
    assert any(k.startswith("clustering/clustering/") for k in reference)
    assert "ers" in reference["main/metric_keys"].tolist() and "ci.ers.low" in reference["main/metric_keys"].tolist()


def test_every_number_is_bit_identical(computed, reference):
    assert sorted(computed) == sorted(reference)
    for key, want in reference.items():
        got = computed[key]
        assert got.shape == want.shape, key
        if got.dtype.kind == "f":
            assert np.array_equal(got, want, equal_nan=True), (key, got, want)
        else:
            assert np.array_equal(got, want), (key, got, want)


if __name__ == "__main__":  # recapture the references: only for an intended change of the numbers
    arrays = compute()
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(REFERENCE, **pack(arrays))
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes, {len(arrays)} arrays)", file=sys.stderr)
