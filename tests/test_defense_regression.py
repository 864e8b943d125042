"""Bit-for-bit regression of one training step of every defense (single-model numbers must not move).

The fair benchmark (``bench/robust28.py``) trains single models with these defenses, and its results
must stay reproducible by the current code. Self-transfer (EAT) added hooks to the defenses
(:class:`rdml.defenses.base.StepState`'s ``adversary`` and ``extra``); without hooks every defense must
compute exactly what it computed before. This test runs ``Defense.step`` of

* ``none``, ``est``, ``act`` (random sampler), ``hm`` with the LGA schedule (two steps, so the
  gradual adversary's previous loss is used), ``hm`` with LGA and ICS, ``hm`` with a destination
  sampler and the boost schedule, and ``panum`` (random start, attack rate 0.5);

on a fixed, seeded tiny model (with a BatchNorm layer, so the eval/train mode switching is covered)
and batch, back-propagates the loss, and compares the loss value, every statistic, the pass count and
every parameter gradient with ``tests/data/defense_regression.npz``, exactly.

The references were captured from the code *before* the self-transfer hooks existed. Recapture
(``python tests/test_defense_regression.py``) only when a change of the numbers is intended, and say
so. One torch thread fixes the float summation order; references taken on x86-64 with torch 2.13 CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

REFERENCE = Path(__file__).parent / "data" / "defense_regression.npz"
EPS, ALPHA, STEPS = 0.3, 0.1, 4

CASES: dict[str, dict] = {
    "none": {"name": "none"},
    "est": {"name": "est"},
    "act": {"name": "act"},
    "hm-lga": {"name": "hm", "hm_src": "softhard", "hm_schedule": "lga"},
    "hm-lga-ics": {"name": "hm", "hm_src": "softhard", "hm_schedule": "lga", "ics": True, "ics_weight": 0.5},
    "hm-boost": {"name": "hm", "hm_src": "softhard", "hm_dst": "semihard", "hm_schedule": "boost"},
    "panum": {"name": "panum", "panum_role": "p", "panum_rate": 0.5, "random_start": True},
}
STEPS_PER_CASE = {"hm-lga": 2}  # the second step reads the first one's adversarial loss (l_prev)


class Net(nn.Module):
    """Conv + BatchNorm + linear embedder with L2-normalised output, initialised from a fixed seed."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            self.conv = nn.Conv2d(1, 6, 3, 2, 1)
            self.bn = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6 * 4 * 4, 12)
        self.embedding_dim = 12

    def forward(self, x):
        return F.normalize(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)), dim=1)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """16 seeded 1x8x8 images in the SPC-2 layout, 4 classes (every class in two pairs)."""
    g = torch.Generator().manual_seed(11)
    labels = torch.arange(8).repeat_interleave(2) % 4
    centres = torch.rand(4, 1, 8, 8, generator=g)
    images = (centres[labels] + 0.25 * torch.randn(16, 1, 8, 8, generator=g)).clamp(0, 1)
    return images, labels


def build(case: str):
    from rdml.config import DefenseConfig, LossConfig, PGDConfig
    from rdml.defenses import build_defense
    from rdml.losses import build_loss

    spec = dict(CASES[case])
    pgd = PGDConfig(eps=EPS, alpha=ALPHA, steps=STEPS, random_start=spec.pop("random_start", False))
    loss_cfg = LossConfig(name="triplet", sampler="random", margin=0.2)
    loss = build_loss(loss_cfg, 4, 12)
    return build_defense(DefenseConfig(pgd=pgd, **spec), loss_cfg, loss)


def run_case(case: str) -> dict[str, np.ndarray]:
    """The numbers of one defense: per step the loss, statistics, passes and parameter gradients."""
    from rdml.defenses import StepState

    model, (images, labels) = Net(), batch()
    defense = build(case)
    generator = torch.Generator().manual_seed(7)
    out: dict[str, np.ndarray] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # none/est mine inside the metric loss, with torch's global RNG
        for step in range(STEPS_PER_CASE.get(case, 1)):
            model.train()
            model.zero_grad(set_to_none=True)
            res = defense.step(model, images, labels, StepState(step=step, epoch=0, progress=0.25 * step,
                                                                generator=generator))
            res.loss.backward()
            p = f"{case}/{step}"
            out[f"{p}/loss"] = np.asarray(float(res.loss.detach()))
            out[f"{p}/passes"] = np.asarray(res.passes)
            keys = sorted(res.stats)
            out[f"{p}/stat_keys"] = np.asarray(keys)
            out[f"{p}/stat_values"] = np.asarray([float(res.stats[k]) for k in keys])
            for name, param in model.named_parameters():
                out[f"{p}/grad/{name}"] = param.grad.detach().numpy().copy()
            out[f"{p}/bn_running_mean"] = model.bn.running_mean.numpy().copy()
    return out


def compute() -> dict[str, np.ndarray]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, np.ndarray] = {}
        for case in CASES:
            out.update(run_case(case))
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def computed() -> dict[str, np.ndarray]:
    return compute()


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_the_reference_covers_every_defense(reference):
    """Guard: the file holds every case, with gradients (a comparison of nothing cannot fail)."""
    for case in CASES:
        assert f"{case}/0/loss" in reference, case
        assert any(k.startswith(f"{case}/0/grad/") for k in reference), case
    assert "hm-lga/1/loss" in reference
    assert "loss_ics" in reference["hm-lga-ics/0/stat_keys"].tolist()
    assert float(reference["hm-lga/0/stat_values"][reference["hm-lga/0/stat_keys"].tolist().index("pgd_iters")]) > 0


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
    np.savez_compressed(REFERENCE, **arrays)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes, {len(arrays)} arrays)", file=sys.stderr)
