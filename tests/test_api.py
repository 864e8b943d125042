"""The public library API: attack objects (self-query and query-to-gallery), rdml.evaluate, defenses by keyword.

Every attack object runs through the same code as the evaluation (one implementation): called on the test
set as its own gallery it reproduces evaluate_robustness number for number; against a separate gallery
nothing is masked, and at eps = 0 it reproduces the benign query-to-gallery R@1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rdml
from rdml.attacks.profiles import AttackProfile, parse_attack_spec
from rdml.attacks.ranking import ATTACKS
from rdml.config import DefenseConfig, LossConfig, PGDConfig
from rdml.defenses import StepState, build_defense
from rdml.errors import ConfigError, DataError
from rdml.eval.compare import evaluate_run
from rdml.eval.retrieval import retrieval_metrics
from rdml.eval.robustness import evaluate_robustness
from rdml.losses import build_loss

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self, scale: float = 1.0, normalize: bool = True) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.fc = nn.Linear(16, 8)
        self.scale, self.normalize = scale, normalize

    def forward(self, x):
        e = self.fc(x.flatten(1) - 0.5)
        return self.scale * (F.normalize(e, dim=1) if self.normalize else e)


def data(n: int, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.rand(classes, 1, 4, 4, generator=torch.Generator().manual_seed(99))
    return (centres[labels] + 0.15 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 1), labels


ALL = ["CA:pm=+:W=2", "CA:pm=-:W=1", "QA:pm=+:M=2", "QA:pm=-:M=1", "SPQA:pm=-:M=1", "TMA", "ES", "LTM", "GTM", "GTT",
       "PANUM:rs=1"]


# ---- attack objects ----------------------------------------------------------------------------------


def test_keyword_objects_are_the_specs_and_refuse_what_they_do_not_take():
    qa = rdml.QA(pm="-", M=2, eps=8 / 255, alpha=2 / 255, steps=10)
    assert qa == parse_attack_spec("QA:pm=-:M=2:eps=8/255:alpha=2/255:pgditer=10").build()
    assert (qa.eps, qa.M, qa.key, qa.budget.steps) == (8 / 255, 2, "QA-", 10)
    assert repr(qa).startswith("QueryAttack('QA:pm=-:M=2")
    assert rdml.CA(pm="+").budget == parse_attack_spec("CA:pm=+").budget  # the same defaults (rob28's budget)
    with pytest.raises(ConfigError, match="takes no argument W"):
        rdml.TMA(W=3)
    with pytest.raises(ConfigError, match="pm"):
        rdml.QA(M=1)
    with pytest.raises(ConfigError, match="eps"):
        rdml.ES(eps=-1)
    built = rdml.load_profile("rob28-adaptive").build()
    assert [a.key for a in built] == [k for k, _ in rdml.load_profile("rob28-adaptive").keyed()]
    assert {type(a) for a in rdml.load_profile("clustering28").build()} == {rdml.CentroidAttack, rdml.ClusterShiftAttack}
    for kind, cls in ATTACKS.items():  # every ranking attack has its short public name
        assert getattr(rdml, kind) is cls


@pytest.mark.parametrize("text", ALL)
def test_an_attack_object_on_its_own_gallery_is_evaluate_robustness(text):
    images, labels = data(40)
    model = Net()
    spec = parse_attack_spec(f"{text}:eps=0.1:alpha=0.03:pgditer=3")
    ref = evaluate_robustness(model, rdml.attacks.inputs.TensorImages(images, labels),
                              AttackProfile(name="one", attacks=(spec,)), batch_size=16, progress=False, seed=2,
                              keep_images=True).outcomes[0]
    out = spec.build()(model, images, labels, batch_size=16, seed=2)
    assert out.values.keys() == ref.values.keys()
    for name, values in ref.values.items():
        assert np.array_equal(out.values[name], values), name
    assert torch.equal(out.adv, ref.adv_images)
    assert (out.targets is None) == (ref.targets is None)
    if out.targets is not None:
        assert np.array_equal(out.targets, ref.targets)
        assert not (out.targets == np.arange(40)[:, None]).any() or text.startswith("PANUM")  # never self
    assert out.mean == {k: float(v.mean()) for k, v in out.values.items()}


@pytest.mark.parametrize("text", ALL)
def test_query_to_gallery_attacks_respect_the_budget_and_target_any_gallery_item(text):
    gallery, g_labels = data(48, seed=1)
    queries, q_labels = data(12, seed=2)
    model = Net()
    atk = parse_attack_spec(f"{text}:eps=0.1:alpha=0.03:pgditer=3").build()
    out = atk(model, queries, q_labels, gallery=gallery, gallery_labels=g_labels, batch_size=5)
    delta = (out.adv - queries).flatten(1).abs().max(1).values
    assert delta.max() <= 0.1 + 1e-6 and out.adv.min() >= 0 and out.adv.max() <= 1
    assert (out.self_index == -1).all() and all(len(v) == 12 for v in out.values.values())
    if out.targets is not None:
        assert out.targets.min() >= (-1 if text.startswith("PANUM") else 0) and out.targets.max() < 48
    assert all(p.grad is None for p in model.parameters())


def test_without_self_nothing_is_masked_and_eps_zero_is_the_benign_query_gallery_r1():
    gallery, g_labels = data(40, seed=1)
    queries, q_labels = data(10, seed=2)
    model = Net()
    with torch.no_grad():
        r1 = retrieval_metrics(model(queries).numpy(), q_labels.numpy(), model(gallery).numpy(), g_labels.numpy())
    for attack, key in ((rdml.ES(eps=0.0), "ES:R"), (rdml.LTM(eps=0.0), "LTM"), (rdml.GTM(eps=0.0), "GTM"),
                        (rdml.PANUM(eps=0.0), "PANUM:clean")):
        out = attack(model, queries, q_labels, gallery=gallery, gallery_labels=g_labels)
        assert out.mean[key] == pytest.approx(r1["recall@1"], abs=1e-12), key
    # the gallery holding exact copies of the queries: each finds its copy, unless told it is its own row
    copies = torch.cat([queries, gallery])
    c_labels = torch.cat([q_labels, g_labels])
    found = rdml.LTM(eps=0.0)(model, queries, q_labels, gallery=copies, gallery_labels=c_labels)
    assert found.mean["LTM"] == 1.0
    own = rdml.LTM(eps=0.0)(model, queries, q_labels, gallery=copies, gallery_labels=c_labels,
                           query_index=np.arange(10))
    from rdml.eval.retrieval import per_query_from_ranks, positive_ranks

    with torch.no_grad():  # the self-excluded R@1 of those 10 items within the whole set
        expected = per_query_from_ranks(*positive_ranks(model(copies).numpy(), c_labels.numpy()))["recall@1"][:10]
    assert np.array_equal(own.values["LTM"], expected)
    # Panum's exclude_self=False without a gallery row: the target is the query's own clean embedding
    out = rdml.PANUM(exclude_self=False, eps=0.05, alpha=0.02, steps=2)(model, queries, q_labels, gallery=gallery,
                                                                          gallery_labels=g_labels)
    assert (out.targets == -1).all()


def test_clustering_attack_objects_and_unnormalised_models():
    images, labels = data(40)
    out = rdml.ClusterShiftAttack(eps=0.2, alpha=0.05, steps=3)(Net(), images, labels)
    assert out.adv.shape == images.shape and (out.adv - images).abs().max() <= 0.2 + 1e-6
    assert set(out.values) == set(out.clean) >= {"nmi", "ari", "recall@1"}
    with pytest.raises(ConfigError, match="no gallery"):
        rdml.CentroidAttack()(Net(), images, labels, gallery=images)
    # an unnormalised model is compared on the unit sphere unless told otherwise
    raw = Net(scale=5.0)
    unit = rdml.ES(eps=0.2, alpha=0.05, steps=3)(raw, images, labels)
    as_is = rdml.ES(eps=0.2, alpha=0.05, steps=3)(raw, images, labels, normalize=False)
    assert unit.mean["ES:D"] <= 2.0 < as_is.mean["ES:D"]
    with pytest.raises(DataError, match="one vector per image"):
        rdml.ES()(nn.Identity(), images, labels)
    with pytest.raises(DataError, match=r"\[0, 1\] pixel space"):
        rdml.ES()(Net(), images * 255, labels)
    with pytest.raises(DataError, match="without labels"):
        rdml.ES()(Net(), images)


# ---- rdml.evaluate ---------------------------------------------------------------------------------


TINY = {"name": "tiny", "ers": True, "budget": {"eps": "0.1", "alpha": "0.03", "steps": 2},
        "attacks": ["CA:pm=+", "CA:pm=-", "QA:pm=+", "QA:pm=-", "TMA", "ES", "LTM", "GTM", "GTT"]}


def test_evaluate_is_evaluate_run_on_the_self_query_path():
    from rdml.attacks.profiles import profile_from_dict

    images, labels = data(40)
    profile = profile_from_dict(TINY)
    dataset = rdml.attacks.inputs.TensorImages(images, labels)
    ref = evaluate_run(Net(), dataset, profile, name="x", batch_size=16, n_boot=50, nmi_boot=3)
    run = rdml.evaluate(Net(), images, profile=profile, labels=labels, batch_size=16, intervals=50, nmi_intervals=3)
    for key, value in ref.metrics.items():
        assert run.metrics[key] == value or (value != value and run.metrics[key] != run.metrics[key]), key
    assert run.metrics["profile"] == "tiny" and run.metrics["esd_driven"] == 0.0 and run.flags == []


def test_evaluate_with_a_gallery_and_the_esd_driven_flag():
    from rdml.attacks.profiles import profile_from_dict
    from rdml.eval.controls import ShrunkModel

    gallery, g_labels = data(40, seed=1)
    queries, q_labels = data(12, seed=2)
    profile = profile_from_dict(TINY)
    run = rdml.evaluate(Net(), (queries, q_labels), gallery=(gallery, g_labels), profile=profile, intervals=20,
                        nmi_intervals=0)
    with torch.no_grad():
        r1 = retrieval_metrics(Net()(queries).numpy(), q_labels.numpy(), Net()(gallery).numpy(), g_labels.numpy())
    assert run.metrics["recall@1"] == pytest.approx(r1["recall@1"])
    assert len(run.benign_per_query["recall@1"]) == 12 and len(run.attack_per_query["LTM"]) == 12
    assert run.metrics["ci.ers.low"] <= run.metrics["ers"] <= run.metrics["ci.ers.high"]
    # a scale-only change (the same ranking, an embedding 20x smaller): the ES:D term carries the ERS
    strong = profile_from_dict({**TINY, "budget": {"eps": "0.3", "alpha": "0.1", "steps": 4}})
    kw = dict(gallery=(gallery, g_labels), profile=strong, intervals=0, normalize=False)
    shrunk = rdml.evaluate(ShrunkModel(Net(), 0.05), (queries, q_labels), **kw)
    healthy = rdml.evaluate(Net(), (queries, q_labels), **kw)
    assert shrunk.metrics["attacks.ES:D/spread"] == pytest.approx(healthy.metrics["attacks.ES:D/spread"], rel=1e-3)
    assert shrunk.metrics["esd_driven"] == 1.0 and shrunk.metrics["esd_scale_gain"] > 5
    assert any("ES:D-DRIVEN" in f for f in shrunk.flags)
    assert healthy.metrics["esd_driven"] == 0.0 and not healthy.flags
    benign = rdml.evaluate(Net(), (queries, q_labels), gallery=(gallery, g_labels), intervals=0)
    assert "ers" not in benign.metrics and benign.metrics["recall@1"] == run.metrics["recall@1"]


# ---- defenses and losses by keyword ----------------------------------------------------------------


class Emb(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8))

    def forward(self, x):
        return F.normalize(self.net(x), dim=1)


def _run(defense, steps: int = 2) -> list:
    model = Emb().train()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 8, 8, generator=g) * 0.8 + 0.1
    labels = torch.arange(8).repeat_interleave(2) % 4
    out = []
    for step in range(steps):
        o = defense.step(model, images, labels, StepState(step, 0, 0.5 * step, torch.Generator().manual_seed(step)))
        o.loss.backward()
        out.append((float(o.loss.detach()), o.passes, o.stats))
    out.append([p.grad.clone() for p in model.parameters()])
    return out


def _same(a: list, b: list) -> None:
    for x, y in zip(a[:-1], b[:-1], strict=True):
        assert x == y
    for ga, gb in zip(a[-1], b[-1], strict=True):
        assert torch.equal(ga, gb)


BUDGET = {"eps": 0.1, "alpha": 0.02, "steps": 6}


@pytest.mark.parametrize("name,kwargs,cfg", [
    ("hm", dict(source="softhard", schedule="lga", ics_weight=0.5, margin=0.2), dict(hm_src="softhard", ics=True)),
    ("hm", dict(source="random", destination="semihard", schedule="boost", xi=0.2), dict(hm_src="random",
                                                                                        hm_schedule="boost", hm_xi=0.2)),
    ("act", dict(sampler="softhard", margin=0.2), {}),
    ("panum", dict(role="a", rate=0.5, margin=0.2), dict(panum_role="a", panum_rate=0.5)),
    ("est", {}, {}),
    ("none", {}, {}),
])
def test_keyword_defenses_are_the_config_built_ones(name, kwargs, cfg):
    sampler = kwargs.get("sampler", "random")
    loss_cfg = LossConfig(name="triplet", sampler=sampler, margin=0.2)
    from_config = build_defense(DefenseConfig(name=name, pgd=PGDConfig(**BUDGET), **cfg), loss_cfg,
                                build_loss(loss_cfg, 4, 8))
    cls = {"hm": rdml.HardnessManipulation, "act": rdml.AntiCollapseTriplet, "panum": rdml.PanumRobust,
           "est": rdml.EmbeddingShiftedTriplet, "none": rdml.NoDefense}[name]
    loss = rdml.TripletLoss(sampler=sampler, margin=0.2) if name in ("est", "none") else None
    by_keyword = cls(**kwargs, loss=loss) if name == "none" else cls(**BUDGET, **kwargs, loss=loss)
    assert type(from_config) is cls and from_config.budget == by_keyword.budget or name == "none"
    _same(_run(from_config), _run(by_keyword))


def test_keyword_defenses_say_what_is_wrong():
    with pytest.raises(ConfigError, match="source='nope' is not a sampler"):
        rdml.HardnessManipulation(source="nope")
    with pytest.raises(ConfigError, match="schedule='fast' is unknown"):
        rdml.HardnessManipulation(schedule="fast")
    with pytest.raises(ConfigError, match="needs a destination sampler"):
        rdml.HardnessManipulation(schedule="none", destination=None)
    with pytest.raises(ConfigError, match="cannot reach its eps"):
        rdml.HardnessManipulation(eps=0.1, alpha=0.001, steps=2)
    assert rdml.HardnessManipulation(eps=0.1, alpha="auto", steps=4).budget.alpha == pytest.approx(2.5 * 0.1 / 4)
    with pytest.raises(ConfigError, match="role"):
        rdml.PanumRobust(role="x")
    with pytest.raises(ConfigError, match="pass one"):
        rdml.EmbeddingShiftedTriplet(eps=0.1, alpha=0.05, steps=2).step(Emb(), torch.rand(4, 1, 8, 8),
                                                                          torch.tensor([0, 0, 1, 1]), StepState())
    assert not rdml.HardnessManipulation().ics and rdml.HardnessManipulation(ics_weight=0.0).ics
