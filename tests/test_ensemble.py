"""EAT in one process: data parts, records, combination, the ensemble objective, self-transfer, checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rdml.attacks.pgd import Budget, frozen_eval, pgd
from rdml.config import build_config
from rdml.data import build_datasets
from rdml.defenses.base import Craft
from rdml.ensemble import (
    EnsembleModel,
    Geometry,
    LocalEnsemble,
    RobustnessStats,
    get_transfer,
    gradient_allgather_bytes,
    gradient_reduce_bytes,
    load_manifest,
    make_stats,
    member_subsets,
    quantise_perturbation,
    stratified_parts,
    train_ensemble,
)
from rdml.ensemble.transfer.ensemble_gradient import EnsembleAdversary


def eat_config(tmp_path=None, train: dict | None = None, defense: dict | None = None, **ensemble):
    """A tiny digits EAT config (2 minmax members x 2 parts, 3 steps); ``train``/``defense``/``ensemble`` keys override."""
    ens = {"members": 2, "parts": 2, "self_transfer": "ensemble_gradient", "steps_per_epoch": 3}
    ens.update(ensemble)
    return build_config({
        "data": {"name": "digits", "batch_pairs": 8},
        "model": {"arch": "c2f2", "embedding_dim": 16},
        "defense": {"name": "minmax", "pgd": {"eps": 0.3, "alpha": 0.15, "steps": 2}, **(defense or {})},
        "train": {"seed": 0, "epochs": 1, "eval_every": 0,
                  "output_dir": str(tmp_path / "runs") if tmp_path else "runs", **(train or {})},
        "ensemble": ens,
        "tracking": {"enabled": False},
    })


@pytest.fixture(scope="module")
def splits():
    torch.set_num_threads(1)
    return build_datasets(build_config({}).data)


# ---------------------------------------------------------------------------------------- data parts
def test_parts_are_disjoint_cover_and_stratified():
    labels = np.repeat(np.arange(5), [30, 31, 29, 40, 33])
    parts = stratified_parts(labels, 3, seed=1)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)  # disjoint and covering
    for p in parts:
        assert set(labels[p]) == set(range(5))  # every part holds every class
    assert stratified_parts(labels, 3, seed=1)[0].tolist() == parts[0].tolist()  # seeded
    assert stratified_parts(labels, 3, seed=2)[0].tolist() != parts[0].tolist()


def test_member_subsets_modes():
    labels = np.repeat(np.arange(4), 30)
    n = len(labels)
    parts = stratified_parts(labels, 3, seed=0)
    loo = member_subsets(labels, 3, 3, "leave_one_out", seed=0)
    for m, s in enumerate(loo):
        assert set(s) == set(range(n)) - set(parts[m])  # excludes exactly part m
        assert set(labels[s]) == set(range(4))
    overlap = len(set(loo[0]) & set(loo[1]))
    assert abs(overlap - n / 3) <= 4  # (N-2)/N of the data
    disjoint = member_subsets(labels, 3, 3, "disjoint", seed=0)
    assert all(len(set(a) & set(b)) == 0 for i, a in enumerate(disjoint) for b in disjoint[i + 1:])
    boot = member_subsets(labels, 2, 3, "bootstrap", seed=0)
    assert all(len(b) == n and len(np.unique(b)) < n and set(labels[b]) == set(range(4)) for b in boot)
    assert all(np.array_equal(s, np.arange(n)) for s in member_subsets(labels, 2, 1, "leave_one_out"))


# ---------------------------------------------------------------------------------------- statistics
def test_statistics_record_and_exchange_volume():
    n = 6
    delta = (torch.rand(n, 1, 4, 4) * 2 - 1) * 0.3
    q, scale = quantise_perturbation(delta, 0.3)
    rec = make_stats(1, 7, torch.arange(n), torch.zeros(n, dtype=torch.long), torch.rand(n), torch.rand(n),
                     torch.rand(n), torch.full((n,), 3), perturbation=(q, scale))
    assert isinstance(rec, RobustnessStats) and rec.check() is rec
    assert rec.sample_ids.dtype == np.int64 and rec.adv_loss.dtype == np.float16 and rec.perturbation.dtype == np.int8
    assert (rec.delta() - delta).abs().max() <= 0.3 / 254 + 1e-6
    assert rec.nbytes == 64 + n * 24 + n * 16
    rec.schema = 99
    with pytest.raises(ValueError, match="schema"):
        rec.check()
    # ResNet-18 at 224, batch 112, 8 PGD steps: the earlier all-gather published 836 MiB per member and step
    before = gradient_allgather_bytes(112, 3, 224, members=3, pgd_steps=8)
    assert round(before["published"] / 2**20) == 836 and before["received"] == 2 * before["published"]
    reduce = gradient_reduce_bytes(112, 3, 224, members=3, pgd_steps=8)
    assert reduce["received"] < before["received"]
    weights = 11_500_000 * 4  # about ResNet-18 with a 512-d head, float32
    after = get_transfer("ensemble_gradient").bytes_per_step(Geometry(112, 3, 224, 3, 8, weights))
    assert after["published"] < before["published"] / 15 and after["received"] == 2 * after["published"]
    cross = get_transfer("cross_member").bytes_per_step(Geometry(112, 3, 224, 3, 8, weights))
    assert cross["published"] > 112 * 3 * 224 * 224
    assert get_transfer("none").bytes_per_step(Geometry(112, 3, 224, 3, 8, weights)) == {"published": 0, "received": 0}


# ---------------------------------------------------------------------------------------- combination
def _tiny(seed: int, dim: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, dim))

    class Emb(nn.Module):
        embedding_dim = dim

        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return torch.nn.functional.normalize(self.net(x), dim=1)

    return Emb().double()


def test_identical_members_give_the_distances_of_one_member():
    member = _tiny(0)
    x = torch.rand(10, 1, 4, 4, dtype=torch.float64)
    one = torch.cdist(member(x), member(x))
    for k in (2, 3):
        ens = EnsembleModel([member] * k, "concat")
        emb = ens(x)
        assert emb.shape[1] == 8 * k
        assert torch.allclose(emb.norm(dim=1), torch.ones(10, dtype=torch.float64))
        assert torch.allclose(torch.cdist(emb, emb), one, atol=1e-10)
        assert torch.allclose(EnsembleModel([member] * k, "mean")(x), member(x))
    # concat: squared distance is the mean of the members' squared distances
    a, b = _tiny(1), _tiny(2)
    e = EnsembleModel([a, b])(x)
    d2 = torch.cdist(e, e) ** 2
    assert torch.allclose(d2, (torch.cdist(a(x), a(x)) ** 2 + torch.cdist(b(x), b(x)) ** 2) / 2, atol=1e-10)


# ---------------------------------------------------------------------------------------- D.7 gradient check
def _pair_loss_objective(model, y):  # a smooth batch objective: minus (mean same-class sq. distance - others)
    def objective(x):
        emb = model(x)
        d = torch.cdist(emb, emb) ** 2
        same = (y.view(-1, 1) == y.view(1, -1)).to(emb)
        return (-((d * same).mean() - (d * (1 - same)).mean()) / len(y)).expand(len(y))

    return objective


def test_ensemble_objective_is_the_mean_and_its_gradient_the_mean_gradient_no_param_grad():
    """D.7: ensemble_gradient's objective is (1/M) sum_j J_j; its input gradient the members' mean gradient."""
    models = [_tiny(s) for s in range(3)]
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    craft = Craft(_pair_loss_objective(models[1], y), x, Budget(0.1, 0.02, 3), torch.arange(6),
                  lambda model, _loss: _pair_loss_objective(model, y))
    adversary = EnsembleAdversary([(0, models[0], None), (1, None, None), (2, models[2], None)])  # member 1's view
    objective = adversary.objective(craft)
    xg = x.clone().requires_grad_(True)
    (g_ens,) = torch.autograd.grad(objective(xg).sum(), xg)
    grads = []
    for m in models:
        xm = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_pair_loss_objective(m, y)(xm).sum(), xm)
        grads.append(g)
    assert torch.allclose(g_ens, torch.stack(grads).mean(0), atol=1e-12)
    f = lambda z: float(objective(z).sum().detach())  # noqa: E731 - finite differences on a few coordinates
    for idx in [(0, 0, 1, 2), (4, 0, 3, 3), (5, 0, 0, 0)]:
        e = torch.zeros_like(x)
        e[idx] = 1e-6
        fd = (f(x + e) - f(x - e)) / 2e-6
        assert abs(fd - float(g_ens[idx])) < 1e-6 * max(1.0, abs(fd)) + 1e-8
    with frozen_eval(models[1]):  # the defense freezes its own model; the adversary freezes the replicas
        result = adversary(craft)
    assert all(p.grad is None for m in models for p in m.parameters())
    assert all(p.requires_grad for m in models for p in m.parameters())  # frozen only while crafting
    assert (result.x_adv - x).abs().max() <= 0.1 + 1e-9 and result.passes == 3 * 3  # 3 members x 3 iterations


def test_none_never_reads_other_members_statistics(splits):
    for mode, reads in (("none", False), ("cross_member", True), ("ensemble_gradient", True)):
        ens = LocalEnsemble(eat_config(members=3, parts=3, self_transfer=mode), splits.train)
        ens.step(0)
        ens.step(1)
        assert all((m.stats_reads > 0) == reads for m in ens.members), mode
        if mode == "none":
            assert ens.last_records == [None, None, None]


def test_cross_member_trains_on_the_examples_the_others_crafted(splits):
    ens = LocalEnsemble(eat_config(members=2, parts=2, self_transfer="cross_member"), splits.train)
    first = ens.step(0)
    assert all("loss_transfer" not in m for m in first)  # nothing crafted before step 0
    second = ens.step(1)
    assert all("loss_transfer" in m and m["passes"] == 2 + 1 + 1 for m in second)  # T + 1 + the transferred batch
    rec = ens.last_records[1]  # what member 1 crafted at step 0, read by member 0 at step 1
    assert rec.step == 0 and rec.member == 1 and rec.perturbation is not None and rec.perturbation.dtype == np.int8
    assert float(np.abs(rec.delta().numpy()).max()) <= 0.3 + 1e-6
    x_t, y_t = ens.members[0].transfer.transferred([rec], 16, torch.Generator().manual_seed(0))
    assert x_t.shape[0] == 16 and set(y_t.tolist()) <= set(rec.labels.tolist())
    assert (y_t[0::2] == y_t[1::2]).all()  # class pairs kept intact: the SPC-2 layout of the member's batch
    assert float(x_t.min()) >= 0 and float(x_t.max()) <= 1


def test_gradient_masking_guard(splits):
    """Examples crafted on the combined ensemble hurt it at least as much as any member's transfer."""
    ens = LocalEnsemble(eat_config(members=3, parts=3, self_transfer="none"), splits.train)
    for s in range(2):
        ens.step(s)
    model = ens.ensemble_model().eval()
    x = torch.stack([splits.test[i][0] for i in range(48)])
    budget = Budget(0.3, 0.05, 6, random_start=True)  # the shift's gradient is 0 at the clean point

    def crafted_on(f):
        with frozen_eval(f), torch.no_grad():
            clean = f(x)
        with frozen_eval(f):
            gen = torch.Generator().manual_seed(0)
            return pgd(lambda z: -((f(z) - clean) ** 2).sum(1), x, budget, generator=gen).x_adv

    with torch.no_grad():
        clean = model(x)

        def damage(x_adv):
            return float(((model(x_adv) - clean) ** 2).sum(1).mean())

        on_ensemble = damage(crafted_on(model))
        transferred = [damage(crafted_on(m)) for m in model.members]
        noise = damage((x + 0.3 * (torch.rand_like(x) * 2 - 1)).clamp(0, 1))
    assert on_ensemble >= max(transferred) - 1e-6
    assert on_ensemble > noise


def test_transfer_guard_on_the_combined_embedding(splits):
    """rdml.ensemble.guard: the ES attack crafted on the ensemble vs transferred from each member, on the whole set."""
    from rdml.ensemble.guard import transfer_guard

    ens = LocalEnsemble(eat_config(members=3, parts=3, self_transfer="none"), splits.train)
    for s in range(2):
        ens.step(s)
    model = ens.ensemble_model().eval()
    out = transfer_guard(model, splits.test, steps=10, alpha=0.05, max_items=64, n_boot=100)
    assert set(out["sources"]) == {"ensemble", "member_0", "member_1", "member_2"} and out["items"] == 64
    own = out["sources"]["ensemble"]
    assert own["shift_low"] <= own["shift"] <= own["shift_high"]
    best = max(v["shift"] for k, v in out["sources"].items() if k != "ensemble")
    assert out["holds_shift"] == (own["shift_high"] >= best) and out["holds"]  # crafted on the combination: no weaker
    assert own["nmi"] < min(v["nmi"] for k, v in out["sources"].items() if k != "ensemble")
    assert all(0 <= v["nmi"] <= 1 and 0 <= v["recall@1"] <= 1 for v in out["sources"].values())


# ---------------------------------------------------------------------------------------- checkpoints, resume
@pytest.mark.slow
def test_resume_in_process_equals_uninterrupted(tmp_path, splits):
    cfg = eat_config(tmp_path, members=2, parts=2, self_transfer="cross_member", steps_per_epoch=2)
    cfg = build_config({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "epochs": 2, "checkpoint_every": 1}})
    straight = train_ensemble(cfg, LocalEnsemble(cfg, splits.train), splits, tmp_path / "a")
    first = train_ensemble(cfg, LocalEnsemble(cfg, splits.train), splits, tmp_path / "b", stop_after=3)
    assert first.steps == 3 and load_manifest(tmp_path / "b").step == 2  # step 3 is lost: not checkpointed
    resumed = train_ensemble(cfg, LocalEnsemble(cfg, splits.train), splits, tmp_path / "b",
                             resume=tmp_path / "b")
    assert resumed.steps == straight.steps == 4
    assert [h["train/loss"] for h in resumed.history] == pytest.approx(
        [h["train/loss"] for h in straight.history[2:]], rel=1e-6)
    assert resumed.metrics["ensemble/recall@1"] == pytest.approx(straight.metrics["ensemble/recall@1"])
    manifest = load_manifest(tmp_path / "b")
    assert manifest.step == 4 and manifest.members == 2 and manifest.config == cfg
    assert "ensemble/nmi" in manifest.metrics and "member_1/recall@1" in manifest.metrics
