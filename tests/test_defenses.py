"""Training-time defenses: the interface, HM's identity / hinge / schedules, ICS, ACT, EST, Panum.

Every test uses a tiny MLP embedding model (L2-normalised output, no BN) on random 8x8 images in an
SPC-2 batch layout, and the real rdml.losses samplers, so the whole file runs in seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rdml.attacks.pgd import Budget
from rdml.config import DefenseConfig, LossConfig, PGDConfig, load_config, recipe_names
from rdml.defenses import DEFENSES, StepState, build_defense, schedules
from rdml.defenses.act import act_perturb
from rdml.defenses.est import es_perturb
from rdml.defenses.hm import hm_perturb
from rdml.defenses.ics import ics_term
from rdml.defenses.panum import panum_mine, panum_perturb
from rdml.errors import ConfigError
from rdml.losses import build_loss, hardness, mine_triplets, triplet_loss

B = 8  # pairs -> 16 images, 8 triplets
EPS, ALPHA, STEPS = 0.1, 0.02, 6


class Tiny(nn.Module):
    """A small embedding model; records the inputs of its train-mode forwards (to inspect the loss batch)."""

    def __init__(self, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, dim))
        self.embedding_dim = dim
        self.train_inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.train_inputs.append(x.detach().clone())
        return F.normalize(self.net(x), dim=1)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2 * B, 1, 8, 8, generator=g) * 0.8 + 0.1
    labels = torch.arange(B).repeat_interleave(2) % 4  # [0,0,1,1,2,2,3,3,0,0,...]
    return images, labels


def dcfg(name: str, **kw) -> DefenseConfig:
    pgd = kw.pop("pgd", {"eps": EPS, "alpha": ALPHA, "steps": STEPS})
    return DefenseConfig(name=name, pgd=PGDConfig(**pgd), **kw)


def make(name: str, sampler: str = "random", **kw):
    loss_cfg = LossConfig(name="triplet", sampler=sampler, margin=0.2)
    return build_defense(dcfg(name, **kw), loss_cfg, build_loss(loss_cfg, 4, 8))


def state(step: int = 0, progress: float = 0.0, seed: int | None = 0) -> StepState:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return StepState(step=step, epoch=0, progress=progress, generator=gen)


def budget(steps: int = STEPS) -> Budget:
    return Budget(EPS, ALPHA, steps)


# ----------------------------------------------------------------------------------------- recipes


def test_every_shipped_recipe_validates():
    names = recipe_names()
    ours = {"cub-hm-sglga-ics", "cub-act-r", "cub-est-r-eta8", "cub-est-r-eta32", "cars-hm-sglga-ics", "cars-act-r",
            "sop-hm-sglga-ics", "sop-act-r", "digits-est", "digits-act", "digits-hm", "digits-hm-ics",
            "digits-panum", "mnist-vanilla", "mnist-act", "mnist-hm-ics", "fashion-vanilla", "fashion-act",
            "fashion-hm-ics"}
    assert ours <= set(names)
    for name in names:
        cfg = load_config(name)
        build_defense(cfg.defense, cfg.loss, build_loss(cfg.loss, 4, cfg.model.embedding_dim))
    hm = load_config("cub-hm-sglga-ics")
    assert (hm.defense.hm_src, hm.defense.hm_schedule, hm.defense.ics, hm.defense.ics_weight) == ("softhard", "lga", True, 0.5)
    assert math.isclose(hm.defense.pgd.eps, 8 / 255) and math.isclose(hm.defense.pgd.alpha, 1 / 255)
    assert (hm.train.lr, hm.train.weight_decay, hm.train.epochs, hm.data.batch_pairs) == (1e-5, 4e-4, 75, 56)
    assert load_config("sop-hm-sglga-ics").defense.ics_weight == 0.05
    assert load_config("cub-est-r-eta32").defense.pgd.steps == 32
    assert load_config("cub-est-r-eta8").model.freeze_bn is False  # robrank's EST trains BN in train mode
    for name in names:  # every training attack can reach its eps (steps x alpha >= eps)
        pgd = load_config(name).defense.pgd
        assert pgd.steps * pgd.step_size >= pgd.eps - 1e-9, name
    for name in ("digits-est", "digits-act", "digits-hm", "digits-hm-ics"):
        pgd = load_config(name).defense.pgd
        assert (math.isclose(pgd.eps, 77 / 255), math.isclose(pgd.alpha, 10 / 255), pgd.steps) == (True, True, 8)
    for name in ("mnist5k-est", "mnist5k-act", "mnist5k-hm", "mnist5k-hm-ics"):  # robrank's 28x28 budget
        pgd = load_config(name).defense.pgd
        assert (math.isclose(pgd.eps, 77 / 255), math.isclose(pgd.alpha, 3 / 255), pgd.steps) == (True, True, 32)
    catride = load_config("mnist5k-catride")  # CA-TRIDE under HM's budget in the fair benchmark
    assert (catride.defense.name, catride.defense.pgd.steps, catride.train.epochs, catride.data.batch_pairs) == \
        ("catride", 32, load_config("mnist5k-hm").train.epochs, load_config("mnist5k-hm").data.batch_pairs)
    assert [load_config(f"{d}-catride").defense.catride_lambda for d in ("cub", "cars", "sop")] == [10.0, 9.5, 2.0]
    panum = load_config("mnist5k-panum").defense.pgd  # Panum's own setting
    assert (panum.eps, panum.steps, panum.random_start) == (0.01, 5, True) and math.isclose(panum.alpha, 0.004)


def test_registry_and_config_errors():
    assert set(DEFENSES) == {"none", "est", "act", "hm", "panum", "minmax", "catride"}
    contrastive = LossConfig(name="contrastive")
    for name in ("act", "hm", "panum", "catride"):
        with pytest.raises(ConfigError, match="loss.name=triplet"):
            build_defense(dcfg(name), contrastive, build_loss(contrastive, 4, 8))
    with pytest.raises(ConfigError, match="hm_dst"):
        make("hm", hm_schedule="none", hm_dst=None)


# ------------------------------------------------------------------------------------- schedules


def test_gradual_adversary_schedules_on_synthetic_losses():
    gamma, u = 0.2, 0.2
    # LGA: H_D = -min(l_prev, u) * gamma / u; the first step (l_prev = 2.0) is the weakest, -gamma.
    assert schedules.lga(schedules.INITIAL_PREVIOUS_LOSS, gamma, u) == pytest.approx(-0.2)
    for l_prev in (0.0, 0.05, 0.1, 0.15, 0.2, 0.5, 2.2):
        assert schedules.lga(l_prev, gamma, u) == pytest.approx(-min(l_prev, u) * gamma / u)
    assert schedules.lga(-0.3, gamma, u) == 0.0  # negative losses are clipped at 0
    assert schedules.lga(0.1, 0.2, 2.2) == pytest.approx(-0.2 * 0.1 / 2.2)  # u = 2.2 ablation
    assert schedules.g2(0.1, gamma, u) == pytest.approx(-0.2 * 0.25)
    assert schedules.gsqrt(0.05, gamma, u) == pytest.approx(-0.2 * 0.5)
    assert schedules.boost_offset(0.05, 0.1, u) == pytest.approx(0.1 * 0.75)
    assert schedules.linear(0.0, -0.2, 0.0) == -0.2 and schedules.linear(0.5, -0.2, 0.0) == pytest.approx(-0.1)
    assert schedules.linear(1.0, -0.2, 0.0) == 0.0 and schedules.linear(3.0, -0.2, 0.0) == 0.0
    for value in (0.0, -0.1, -0.2, 0.7):
        cfg = dcfg("hm", hm_schedule="constant", hm_constant=value)
        assert schedules.scalar_destination(cfg, gamma, 0.123, 0.5) == value
        assert schedules.scalar_destination("constant", gamma, 0.123, 0.5, constant=value) == value


@pytest.mark.parametrize(
    "schedule, expect",
    [
        ("lga", lambda l_prev, p: -min(l_prev, 0.2)),
        ("g2", lambda l_prev, p: -0.2 * (min(l_prev, 0.2) / 0.2) ** 2),
        ("gsqrt", lambda l_prev, p: -0.2 * math.sqrt(min(l_prev, 0.2) / 0.2)),
        ("linear", lambda l_prev, p: -0.2 + 0.2 * p),
        ("constant", lambda l_prev, p: -0.1),
    ],
)
def test_hm_destination_follows_schedule_and_previous_loss(schedule, expect):
    model, (images, labels) = Tiny(), batch()
    defense = make("hm", hm_schedule=schedule, hm_constant=-0.1)
    out1 = defense.step(model, images, labels, state(0, 0.0))
    assert out1.stats["hardness_dst"] == pytest.approx(expect(2.0, 0.0), abs=1e-6)
    assert out1.stats["hm_prev_loss"] == 2.0
    out2 = defense.step(model, images, labels, state(1, 0.5))
    assert out2.stats["hardness_dst"] == pytest.approx(expect(out1.stats["loss_adv"], 0.5), abs=1e-6)
    # the previous loss survives a resume
    resumed = make("hm", hm_schedule=schedule, hm_constant=-0.1)
    resumed.load_state_dict(defense.state_dict())
    assert resumed.state_dict() == {"prev_loss": out2.stats["loss_adv"]}


def test_hm_boost_adds_xi_offset_to_sampler_destination():
    model, (images, labels) = Tiny(), batch()
    plain = make("hm", hm_src="random", hm_dst="semihard", hm_schedule="none")
    boost = make("hm", hm_src="random", hm_dst="semihard", hm_schedule="boost", hm_xi=0.1)
    boost.load_state_dict({"prev_loss": 0.05})  # l̄ = 0.25 -> offset 0.1 * 0.75
    emb = model.eval()(images).detach()
    h_plain = plain.destination(emb, labels, state())
    h_boost = boost.destination(emb, labels, state())
    assert torch.allclose(h_boost - h_plain, torch.full_like(h_plain, 0.075), atol=1e-6)


# ------------------------------------------------------------------------------------------ HM


@pytest.mark.parametrize("sampler", ["random", "softhard", "semihard"])
def test_hm_identity_equals_regular_training(sampler):
    images, labels = batch(1)
    m1, m2 = Tiny(seed=3), Tiny(seed=3)
    hm = make("hm", hm_src=sampler, hm_dst=sampler, hm_schedule="none")
    regular = make("none", sampler=sampler)
    torch.manual_seed(7)
    out_hm = hm.step(m1, images, labels, StepState(0, 0, 0.0))
    torch.manual_seed(7)
    out_reg = regular.step(m2, images, labels, StepState(0, 0, 0.0))
    assert out_hm.passes == 1 and out_hm.stats["pgd_iters"] == 0 and out_hm.stats["perturbed_frac"] == 0
    assert torch.equal(m1.train_inputs[-1], images)  # the batch was left untouched
    assert float(out_hm.loss.detach()) == float(out_reg.loss.detach())
    out_hm.loss.backward()
    out_reg.loss.backward()
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1.grad, p2.grad)


def test_hm_src_equals_dst_with_schedule_still_perturbs():
    """The reference code short-circuits src == dst even with a gradual schedule (a bug); we do not."""
    model, (images, labels) = Tiny(), batch()
    out = make("hm", hm_src="softhard", hm_dst="softhard", hm_schedule="constant", hm_constant=1.0).step(
        model, images, labels, state()
    )
    assert out.passes > 1 and out.stats["perturbed_frac"] > 0


def test_hm_hinge_freeze_overshoot_and_budget():
    model, (images, labels) = Tiny(), batch(2)
    model.eval()
    emb = model(images).detach()
    a, p, n = mine_triplets(emb, labels, "random", margin=0.2, generator=torch.Generator().manual_seed(0))
    h_src = hardness(emb, a, p, n)
    # per-triplet destinations: already satisfied, reachable, and out of reach (2.0)
    offsets = torch.tensor([-0.05, -0.01, 0.02, 0.05, 0.1, 0.2, 2.5, -0.3])
    h_dst = (h_src + offsets).clamp(max=2.0)
    res = hm_perturb(model, images, a, p, n, h_dst, budget())
    x0 = torch.cat([images[a], images[p], images[n]])
    delta = res.x_adv - x0
    assert float(delta.abs().max()) <= EPS + 1e-6
    assert float(res.x_adv.min()) >= 0 and float(res.x_adv.max()) <= 1
    trip_delta = delta.view(3, B, -1).abs().amax(dim=(0, 2))
    start_ok = h_src >= h_dst
    assert bool(start_ok.any()) and bool((~start_ok).any())
    assert torch.all(trip_delta[start_ok] == 0) and torch.all(res.iterations[start_ok] == 0)
    early = res.iterations < STEPS
    assert torch.all(res.h_adv[early] >= h_dst[early] - 1e-6)  # reached the destination...
    assert torch.all(res.iterations[~early] == STEPS)  # ...or used all steps
    assert bool((res.iterations == STEPS).any()) and bool(((res.iterations > 0) & early).any())
    # overshoot at most one step: one step earlier each stopped triplet was still below its destination
    for k in range(1, STEPS):
        stopped_at_k = res.iterations == k
        if stopped_at_k.any():
            before = hm_perturb(model, images, a, p, n, h_dst, budget(k - 1))
            assert torch.all(before.h_adv[stopped_at_k] < h_dst[stopped_at_k])
    assert res.passes <= STEPS


def test_hm_step_direction_is_sign_of_hardness_gradient():
    model, (images, labels) = Tiny(), batch(3)
    model.eval()
    emb = model(images).detach()
    a, p, n = mine_triplets(emb, labels, "random", margin=0.2, generator=torch.Generator().manual_seed(1))
    h_dst = torch.full((B,), 2.0)  # never satisfied: every triplet steps
    res = hm_perturb(model, images, a, p, n, h_dst, budget(1))
    x0 = torch.cat([images[a], images[p], images[n]]).requires_grad_(True)
    idx = torch.arange(B)
    (g,) = torch.autograd.grad(hardness(model(x0), idx, idx + B, idx + 2 * B).sum(), x0)
    expected = (x0.detach() + ALPHA * g.sign()).clamp(0, 1)
    assert torch.allclose(res.x_adv, expected, atol=1e-7)
    # a training attack *written* with one step is FGSM: one sign step of size eps (robrank's eta = 1)
    fgsm = Budget.from_config(PGDConfig(eps=EPS, alpha=ALPHA, steps=1))
    res = hm_perturb(model, images, a, p, n, h_dst, fgsm)
    assert torch.allclose(res.x_adv, (x0.detach() + EPS * g.sign()).clamp(0, 1), atol=1e-7)


def test_hm_early_stop_when_everything_starts_saturated():
    model, (images, labels) = Tiny(), batch()
    out = make("hm", hm_schedule="constant", hm_constant=-2.0).step(model, images, labels, state())
    assert out.stats["perturbed_frac"] == 0 and out.passes == 2  # one PGD evaluation + the update


def test_hm_restores_model_mode_and_grads():
    model, (images, labels) = Tiny(), batch()
    model.train()
    out = make("hm", hm_schedule="constant", hm_constant=0.5, ics=True).step(model, images, labels, state())
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # PGD left no parameter gradients
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("objective", ["l2", "kl"])
def test_hm_experimental_objectives_run(objective, caplog):
    model, (images, labels) = Tiny(), batch()
    with caplog.at_level("WARNING"):
        defense = make("hm", hm_schedule="constant", hm_constant=0.0, hm_objective=objective)
    assert "experimental" in caplog.text
    out = defense.step(model, images, labels, state())
    assert torch.isfinite(out.loss) and 1 < out.passes <= STEPS + 1


# ----------------------------------------------------------------------------------------- ICS


def test_ics_zero_weight_equals_hm_alone():
    images, labels = batch(4)
    m1, m2 = Tiny(seed=5), Tiny(seed=5)
    hm = make("hm", hm_schedule="constant", hm_constant=0.3)
    hm_ics = make("hm", hm_schedule="constant", hm_constant=0.3, ics=True, ics_weight=0.0)
    out1 = hm.step(m1, images, labels, state())
    out2 = hm_ics.step(m2, images, labels, state())
    assert float(out1.loss.detach()) == float(out2.loss.detach()) and "loss_ics" in out2.stats
    assert out2.passes == out1.passes + 1  # ICS's benign forward/backward is counted
    out1.loss.backward()
    out2.loss.backward()
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-7)


def test_ics_term_zero_when_adversarial_anchor_stays_closer_than_positive():
    g = torch.Generator().manual_seed(0)
    anchor = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    positive = F.normalize(anchor + 0.5 * torch.randn(6, 8, generator=g), dim=1)
    close = F.normalize(anchor + 0.01 * torch.randn(6, 8, generator=g), dim=1)
    assert float(ics_term(anchor, close, positive)) == 0.0
    far = -anchor  # d(a, ã) = 2 > d(a, p)
    expected = (F.pairwise_distance(anchor, far) - F.pairwise_distance(anchor, positive)).clamp_min(0).mean()
    assert float(ics_term(anchor, far, positive)) == pytest.approx(float(expected), rel=1e-5)
    # with a zero budget the adversarial anchor is the benign one: L_ICS = 0
    model, (images, labels) = Tiny(), batch()
    out = make("hm", hm_schedule="constant", hm_constant=0.5, ics=True, pgd={"eps": 0.0, "alpha": 0.0, "steps": 4}).step(
        model, images, labels, state()
    )
    assert out.stats["loss_ics"] == 0.0


# ----------------------------------------------------------------------------------------- ACT


@pytest.mark.parametrize("sampler", ["random", "softhard"])
def test_act_perturbs_only_positives_and_negatives(sampler):
    model, (images, labels) = Tiny(), batch(5)
    defense = make("act", sampler=sampler)
    model.train_inputs.clear()
    out = defense.step(model, images, labels, state(seed=3))
    a, p, n = mine_triplets(model.eval()(images).detach(), labels, sampler, margin=0.2,
                            generator=torch.Generator().manual_seed(3))
    model.train()
    loss_batch = model.train_inputs[-1]
    assert torch.equal(loss_batch[:B], images[a])  # anchors bit-identical
    assert not torch.equal(loss_batch[B:2 * B], images[p]) and not torch.equal(loss_batch[2 * B:], images[n])
    assert float((loss_batch[B:] - torch.cat([images[p], images[n]])).abs().max()) <= EPS + 1e-6
    assert out.passes == STEPS + 1
    assert out.stats["act_pn_distance_after"] < out.stats["act_pn_distance_before"]


def test_act_perturb_collapses_pairs():
    model, (images, _) = Tiny(), batch(6)
    p, n = torch.arange(0, 2 * B, 2), torch.arange(1, 2 * B, 2).flip(0)
    res = act_perturb(model, images, p, n, budget())
    assert float(res.distance_after.mean()) < float(res.distance_before.mean())
    assert res.passes == STEPS


# ----------------------------------------------------------------------------------------- EST


def test_est_maximises_embedding_shift():
    model, (images, labels) = Tiny(), batch(7)
    res, shift = es_perturb(model, images, budget(), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    noise = (torch.rand(images.shape, generator=g) * 2 - 1).sign() * EPS
    model.eval()
    with torch.no_grad():
        ref = model(images)
        noise_shift = (model((images + noise).clamp(0, 1)) - ref).norm(dim=1)
    assert float(shift.mean()) > 2 * float(noise_shift.mean())
    assert res.history[-1] < res.history[0]  # the objective (-shift) improved
    assert float((res.x_adv - images).abs().max()) <= EPS + 1e-6
    out = make("est").step(model.train(), images, labels, state())
    assert out.passes == STEPS + 1 and out.stats["embedding_shift"] > 0 and out.stats["perturbed_frac"] == 1.0


# --------------------------------------------------------------------------------------- Panum


def test_panum_rate_zero_equals_clean_training_on_same_tuples():
    images, labels = batch(8)
    model = Tiny(seed=9)
    out = make("panum", panum_rate=0.0).step(model, images, labels, state(seed=11))
    model.eval()
    with torch.no_grad():
        a, p, n = panum_mine(model(images), labels, torch.Generator().manual_seed(11))
    model.train()
    expected = triplet_loss(model(images), a, p, n, 0.2, reduction="nonzero_mean")
    assert float(out.loss.detach()) == float(expected.detach())
    assert out.passes == 1 and out.stats["perturbed_frac"] == 0


@pytest.mark.parametrize("role", ["a", "p", "n"])
def test_panum_rate_one_appends_one_copy_per_tuple(role):
    images, labels = batch(9)
    model = Tiny()
    defense = make("panum", panum_rate=1.0, panum_role=role)
    out = defense.step(model, images, labels, state())
    batch_labels, roles = defense.last_batch
    k = len(roles["a"])  # Panum mines one tuple per anchor, every sample being an anchor
    assert 0 < k <= 2 * B and len(set(roles["a"].tolist())) == k if role != "a" else 0 < k <= 2 * B
    assert batch_labels.shape[0] == 2 * B + k  # one appended copy per tuple
    assert model.train_inputs[-1].shape[0] == 2 * B + k
    member = roles[role]
    assert torch.equal(member, torch.arange(2 * B, 2 * B + k))  # every role index points at its copy
    others = [roles[r] for r in "apn" if r != role]
    assert all(bool((o < 2 * B).all()) for o in others)
    # the copies keep their member's label: positives/anchors share the class, negatives do not
    same = batch_labels[roles["p"]] == batch_labels[roles["a"]]
    different = batch_labels[roles["n"]] != batch_labels[roles["a"]]
    assert bool(same.all()) and bool(different.all())
    assert out.passes == STEPS + 1 and out.stats["perturbed_frac"] == 1.0


def test_panum_references_carry_no_gradient_and_objective_rises():
    images, labels = batch(10)
    model = Tiny()
    model.eval()
    clean = model(images).detach().requires_grad_(True)  # a reference that *could* receive gradient
    a, p, n = mine_triplets(clean.detach(), labels, "random", margin=0.2, generator=torch.Generator().manual_seed(0))
    attacked = torch.arange(B)
    for role in "apn":
        res = panum_perturb(model, images, clean, a, p, n, role, attacked, budget())
        assert clean.grad is None and all(q.grad is None for q in model.parameters())
        assert res.pgd.history[-1] < res.pgd.history[0]  # minimised loss falls = inner objective rises
        assert float((res.x_adv - images[{"a": a, "p": p, "n": n}[role]]).abs().max()) <= EPS + 1e-6


# ------------------------------------------------------------------------------------------ cost


def test_passes_reported_for_every_defense():
    images, labels = batch(11)
    expected = {"none": (1, 1), "est": (STEPS + 1, STEPS + 1), "act": (STEPS + 1, STEPS + 1),
                "hm": (2, STEPS + 1), "panum": (STEPS + 1, STEPS + 1), "minmax": (STEPS + 1, STEPS + 1)}
    for name, (lo, hi) in expected.items():
        kw = {"hm_schedule": "constant", "hm_constant": 0.2} if name == "hm" else {}
        out = make(name, **kw).step(Tiny(), images, labels, state())
        assert lo <= out.passes <= hi, name
        assert out.loss.requires_grad and torch.isfinite(out.loss)
        assert {"loss", "loss_adv", "pgd_iters", "perturbed_frac"} <= set(out.stats)
        assert all(isinstance(v, float) for v in out.stats.values())


def test_defenses_accept_m_per_class_batches():
    """Not only SPC-2: with an m-per-class batch every sample is an anchor (as in TripletLoss)."""
    images, _ = batch(12)
    labels = torch.arange(2 * B) % 4  # [0,1,2,3,0,1,...]: not the pairs layout
    for name, kw in [("hm", {"hm_schedule": "constant", "hm_constant": 0.2, "ics": True}), ("act", {}),
                     ("panum", {}), ("est", {}), ("none", {}), ("minmax", {})]:
        model = Tiny()
        out = make(name, **kw).step(model, images, labels, state())
        assert torch.isfinite(out.loss), name
        if name in ("act", "panum"):
            expected_rows = {"act": 3 * 2 * B, "panum": 2 * B + 2 * B}[name]
            assert model.train_inputs[-1].shape[0] == expected_rows, name


# ---------------------------------------------------------------------------------------- CA-TRIDE


def test_catride_soft_max_distance_and_collapseness():
    from rdml.defenses.catride import collapseness, soft_max_distance

    d = torch.tensor([0.2, 0.5, 1.1])
    assert math.isclose(float(soft_max_distance(d, 1e-6)), float(d.mean()), rel_tol=1e-5)  # lambda -> 0: the mean
    assert math.isclose(float(soft_max_distance(d, 200.0)), 1.1, rel_tol=1e-6)  # lambda -> inf: the largest
    assert float(collapseness(torch.tensor([0.1, 0.2]), torch.tensor([0.9, 1.0]), 10.0)) < 0  # well ordered
    assert float(collapseness(torch.tensor([0.9, 1.0]), torch.tensor([0.1, 0.2]), 10.0)) > 0  # inverted


@pytest.mark.parametrize("step", [0, 1])
def test_catride_perturbs_candidates_or_anchor_in_turn(step):
    """Even steps perturb only P and N (anchor clean), odd steps only A; within eps, in [0,1]."""
    defense = make("catride")
    model = Tiny()
    images, labels = batch()
    out = defense.step(model, images, labels, state(step=step, progress=1.0))
    fed = model.train_inputs[-1]  # the one update forward: [A; P; N]
    a, p, n = fed.chunk(3)
    clean = {tuple(x.flatten().tolist()) for x in images}
    moved = [not {tuple(x.flatten().tolist()) for x in part} <= clean for part in (a, p, n)]
    assert out.stats["catride_anchor_phase"] == float(step % 2)
    assert moved == ([False, True, True] if step % 2 == 0 else [True, False, False])
    # the tiny model's batch starts ordered (collapseness < 0): PGD runs until the objective reaches 0, early
    assert out.stats["catride_collapseness_clean"] < 0 and out.stats["catride_objective_before"] > 0
    assert 0 < out.stats["pgd_iters"] < STEPS and out.stats["catride_objective_after"] < 1e-5
    assert out.passes == out.stats["pgd_iters"] + 2  # the iterations, the evaluation that stops, the update
    # every perturbed row is an image of the batch moved by at most eps
    for part, on in zip((a, p, n), moved, strict=True):
        if on:
            dist = (part.unsqueeze(1) - images.unsqueeze(0)).abs().flatten(2).amax(2).amin(1)
            assert float(dist.max()) <= EPS + 1e-6 and float(part.min()) >= 0 and float(part.max()) <= 1
    assert torch.isfinite(out.loss) and out.loss.requires_grad


def test_catride_adversary_lowers_its_objective_and_warms_up():
    """PGD minimises the phase's objective (never above its clean value); at progress 0 the ramped step is 0:
    nothing is perturbed and the step costs one pass."""
    defense = make("catride", pgd={"eps": 0.3, "alpha": 0.05, "steps": 10})
    images, labels = batch(3)
    for step in (0, 1):
        out = defense.step(Tiny(), images, labels, state(step=step, progress=1.0))
        assert out.stats["catride_objective_after"] <= out.stats["catride_objective_before"] + 1e-6
    cold = defense.step(Tiny(), images, labels, state(step=0, progress=0.0))
    assert cold.passes == 1 and cold.stats["pgd_iters"] == 0
    assert make("catride", catride_warmup=False).step(Tiny(), images, labels, state(progress=0.0)).passes > 1


def test_catride_options_are_checked():
    with pytest.raises(ValueError, match="only used by defense.name=catride"):
        dcfg("hm", catride_lambda=2.0)
    with pytest.raises(ConfigError, match="lam"):
        DEFENSES["catride"](lam=0.0)
