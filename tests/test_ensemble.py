"""EAT in one process: data parts, statistics record, combination, reductions, gradient checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rdml.attacks.pgd import Budget, frozen_eval, pgd
from rdml.config import build_config
from rdml.data import SubsetDataset, build_datasets, make_train_loader
from rdml.ensemble import (
    EnsembleModel,
    ExchangedObjective,
    LocalEnsemble,
    RobustnessStats,
    bytes_per_step,
    chunk_losses,
    ensemble_objective,
    load_manifest,
    make_stats,
    member_subsets,
    quantise_perturbation,
    stratified_parts,
    train_ensemble,
)
from rdml.losses import build_loss
from rdml.models import build_model
from rdml.train.optim import build_optimizer


def eat_config(tmp_path=None, train: dict | None = None, **ensemble):
    """A tiny digits EAT config (2 members x 2 parts, 3 steps); ``train``/``ensemble`` keys override."""
    ens = {"members": 2, "parts": 2, "self_transfer": "ensemble_gradient", "steps_per_epoch": 3}
    ens.update(ensemble)
    return build_config({
        "data": {"name": "digits", "batch_pairs": 8},
        "model": {"arch": "c2f2", "embedding_dim": 16},
        "defense": {"pgd": {"eps": 0.3, "alpha": 0.1, "steps": 2}},
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
def test_statistics_record_and_sizes():
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
    sizes = bytes_per_step(112, 3, 224, "cross_member")
    assert sizes["perturbation"] == 112 * 3 * 224 * 224 and sizes["total"] > sizes["perturbation"]
    assert bytes_per_step(112, 3, 224, "none")["total"] < 4096
    grad = bytes_per_step(112, 3, 224, "ensemble_gradient", members=3, pgd_steps=8)
    assert grad["gradients"] > 8 * 3 * 112 * 3 * 224 * 224 * 2


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
class _Holder:
    """Just what ensemble_objective needs from a member: model, loss, rng()."""

    def __init__(self, model, loss):
        self.model, self.loss = model, loss

    def rng(self):
        import contextlib

        return contextlib.nullcontext()


def _pair_loss(emb, y):  # a smooth batch loss: mean squared distance of same-class pairs minus others
    d = torch.cdist(emb, emb) ** 2
    same = (y.view(-1, 1) == y.view(1, -1)).to(emb)
    return (d * same).mean() - (d * (1 - same)).mean()


def test_ensemble_gradient_is_mean_of_member_gradients_and_no_param_grad():
    members = [_Holder(_tiny(s), _pair_loss) for s in range(3)]
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    labels, sizes = [torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])], [3, 3]
    objective = ensemble_objective(members, labels, sizes)
    xg = x.clone().requires_grad_(True)
    (g_ens,) = torch.autograd.grad(objective(xg).sum(), xg)
    grads = []
    for m in members:
        xm = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((-chunk_losses(m.model, m.loss, xm, labels, sizes)).sum(), xm)
        grads.append(g)
    assert torch.allclose(g_ens, torch.stack(grads).mean(0), atol=1e-12)
    # finite differences on a few coordinates
    f = lambda z: float(objective(z).sum().detach())  # noqa: E731
    for idx in [(0, 0, 1, 2), (4, 0, 3, 3), (5, 0, 0, 0)]:
        e = torch.zeros_like(x)
        e[idx] = 1e-6
        fd = (f(x + e) - f(x - e)) / 2e-6
        assert abs(fd - float(g_ens[idx])) < 1e-6 * max(1.0, abs(fd)) + 1e-8
    # the distributed form (own gradient + exchange) gives the same gradient
    contributions = []
    for m in members:
        xm = x.clone().requires_grad_(True)
        loss = -chunk_losses(m.model, m.loss, xm, labels, sizes)
        (g,) = torch.autograd.grad(loss.sum(), xm)
        contributions.append((loss.detach(), g))
    own = members[0]
    exchanged = ExchangedObjective(lambda z: -chunk_losses(own.model, own.loss, z, labels, sizes),
                                   lambda losses, grad: [(losses, grad), *contributions[1:]])
    xg = x.clone().requires_grad_(True)
    (g_x,) = torch.autograd.grad(exchanged(xg).sum(), xg)
    assert torch.allclose(g_x, g_ens, atol=1e-12)
    # crafting leaves no parameter gradient behind
    with frozen_eval(*[m.model for m in members]):
        result = pgd(objective, x.float().double(), Budget(0.1, 0.02, 3))
    assert all(p.grad is None for m in members for p in m.model.parameters())
    assert (result.x_adv - x).abs().max() <= 0.1 + 1e-9


# ---------------------------------------------------------------------------------------- reductions
def test_single_member_equals_single_model_adversarial_training(splits):
    """M=1, N=1 EAT (any mode) = single-model PGD-AT with the same seed: the same loss trajectory."""
    cfg = eat_config(members=1, parts=1)
    ens = LocalEnsemble(cfg, splits.train)
    eat_losses = [ens.step(s)[0]["loss"] for s in range(4)]

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, 1, splits.train.image_size)
    loss_fn = build_loss(cfg.loss, splits.train.num_classes, model.embedding_dim)
    opt = build_optimizer(cfg, model, loss_fn)
    full = SubsetDataset(splits.train, np.arange(len(splits.train)))
    with torch.random.fork_rng(devices=[]):  # the loader's base-seed draw is not part of training
        batches = iter(make_train_loader(full, cfg.data, seed=cfg.train.seed, epoch=0))
    budget = Budget.from_config(cfg.defense.pgd)
    ref_losses = []
    for _ in range(4):
        with torch.random.fork_rng(devices=[]):
            x, y, _ = next(batches)
        with frozen_eval(model, loss_fn):
            gen = torch.Generator().manual_seed(0)
            x_adv = pgd(lambda z, y=y: -loss_fn(model(z), y).expand(len(y)) / len(y), x, budget, generator=gen).x_adv
        model.train()
        loss = loss_fn(model(x_adv), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(float(loss))
    assert eat_losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert ref_losses[0] != ref_losses[-1]


def test_none_never_reads_other_members_statistics(splits):
    for mode, reads in (("none", False), ("cross_member", True)):
        ens = LocalEnsemble(eat_config(members=3, parts=3, self_transfer=mode), splits.train)
        ens.step(0)
        assert all((m.stats_reads > 0) == reads for m in ens.members), mode
    with pytest.raises(ValueError, match="must not receive"):
        none = LocalEnsemble(eat_config(self_transfer="none"), splits.train)
        none.step(0)
        none.members[0].draw()
        none.members[0].craft_own(1)
        none.members[0].update(none.last_stats[1:])


def test_cross_member_trains_on_transferred_examples(splits):
    ens = LocalEnsemble(eat_config(members=2, parts=2, self_transfer="cross_member"), splits.train)
    metrics = ens.step(0)
    assert all("loss_transfer" in m for m in metrics)
    rec = ens.last_stats[1]
    assert rec.perturbation is not None and rec.perturbation.dtype == np.int8
    x_t, y_t = ens.members[0].transferred_batch([rec])
    assert x_t.shape[0] == len(ens.members[0].batch[1]) and set(y_t.tolist()) <= set(rec.labels.tolist())
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
