"""One member step for every defense, one strategy per self-transfer mode, the ensemble settings checked together.

* a member's update is ``Defense.train_step`` of the configured defense: an ensemble of HM (or ACT)
  members runs HM (its hardness statistics appear), in every mode;
* one member on the whole set is ``rdml train`` (:func:`rdml.train.fit`) step for step with the same seed;
* a mode registered here, in a test, runs in the in-process backend unchanged (on Ray:
  ``tests/test_eat_distributed.py``);
* the ensemble settings, the defense and the mode's requirements are refused together, before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_ensemble import eat_config

from rdml.config import build_config, registry_values
from rdml.data import build_datasets
from rdml.ensemble import SELF_TRANSFER, LocalEnsemble, SelfTransfer, check_ensemble, register, train_ensemble
from rdml.errors import ConfigError


@pytest.fixture(scope="module")
def splits():
    torch.set_num_threads(1)
    return build_datasets(build_config({}).data)


# ------------------------------------------------------------------------------------- every defense
HM = {"name": "hm", "hm_src": "softhard", "hm_schedule": "lga", "ics": True, "ics_weight": 0.5}


@pytest.mark.parametrize("mode", ["none", "cross_member", "ensemble_gradient"])
def test_hm_members_run_hm_in_every_mode(splits, mode):
    ens = LocalEnsemble(eat_config(self_transfer=mode, defense=HM), splits.train)
    rows = [ens.step(s) for s in range(2)]
    for metrics in rows[-1]:
        assert {"hardness_src", "hardness_dst", "hardness_adv", "loss_ics", "hm_prev_loss"} <= set(metrics)
        assert metrics["hm_prev_loss"] != 2.0  # the gradual adversary read the first step's adversarial loss
    engine = [m["passes"] - 2 - ("loss_transfer" in m) for m in rows[-1]]  # minus the update, ICS, transfer
    if mode == "ensemble_gradient":  # every PGD iteration goes through both members
        assert all(p % 2 == 0 and 0 <= p <= 2 * 2 for p in engine)
    else:
        assert all(0 <= p <= 2 for p in engine)
    if mode == "cross_member":
        assert all("loss_transfer" in m for m in rows[-1])
    assert all(m.defense.name == "hm" and m.defense.prev_loss != 2.0 for m in ens.members)


def test_act_members_run_act(splits):
    ens = LocalEnsemble(eat_config(self_transfer="ensemble_gradient", defense={"name": "act"}), splits.train)
    metrics = ens.step(0)
    assert all({"act_pn_distance_before", "act_pn_distance_after", "hardness_adv"} <= set(m) for m in metrics)
    assert all(m["passes"] == 2 * 2 + 1 for m in metrics)  # 2 PGD iterations x 2 members + the update


@pytest.mark.parametrize("mode", ["none", "ensemble_gradient"])
def test_catride_members_run_catride_in_both_phases(splits, mode):
    """CA-TRIDE's two phases inside an ensemble: candidates on even steps, the anchor on odd ones; with
    ensemble_gradient every PGD iteration goes through both members."""
    ens = LocalEnsemble(eat_config(self_transfer=mode, defense={"name": "catride", "catride_warmup": False}),
                        splits.train)
    for step in range(2):
        for metrics in ens.step(step):
            assert metrics["catride_anchor_phase"] == float(step % 2)
            assert {"catride_collapseness_clean", "catride_objective_before", "catride_objective_after"} <= set(metrics)
            assert metrics["catride_objective_after"] <= metrics["catride_objective_before"] + 1e-6
            if mode == "ensemble_gradient":
                assert (metrics["passes"] - 1) % 2 == 0
    assert all(m.defense.name == "catride" for m in ens.members)


# ------------------------------------------------------------------------------------- --members 1 = rdml train
class _Steps:
    """A fit callback that records every step's statistics."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_step(self, step: int, stats: dict[str, float]) -> None:
        self.rows.append(dict(stats))


@pytest.mark.parametrize("defense", [{"name": "minmax", "pgd": {"eps": 0.3, "alpha": 0.15, "steps": 2,
                                                               "random_start": True}}, HM])
def test_one_member_is_rdml_train_step_for_step(tmp_path, splits, defense):
    """members=1, parts=1: the same statistics at every step and the same final weights as fit, same seed.

    Two epochs of 3 steps: the epoch boundary reseeds and steps the (step) learning-rate schedule."""
    from rdml.train import fit, load_model

    pgd = defense.get("pgd", {"eps": 0.3, "alpha": 0.15, "steps": 2})
    cfg = eat_config(tmp_path, members=1, parts=1, self_transfer="none", steps_per_epoch=None,
                     defense={**defense, "pgd": pgd},
                     train={"epochs": 2, "max_steps_per_epoch": 3, "seed": 4, "lr_schedule": "step",
                            "lr_step_epochs": 1, "lr_gamma": 0.5, "grad_clip": 1.0})
    cfg = build_config({**cfg.to_dict(), "tracking": {"enabled": False}})
    steps = _Steps()
    result = fit(cfg, callbacks=[steps], run_dir=tmp_path / "single", progress=False)
    ens = LocalEnsemble(cfg, splits.train)
    assert ens.steps_per_epoch() == 3
    rows = [ens.step(s)[0] for s in range(6)]
    assert rows == steps.rows  # every statistic, bit for bit
    single, _ = load_model(result.checkpoint)
    member = ens.members[0].model_state()
    assert all(torch.equal(v, member[k]) for k, v in single.state_dict().items())
    assert ens.members[0].optimizer.param_groups[0]["lr"] == pytest.approx(cfg.train.lr * 0.25)


def test_members_flag_one_means_the_whole_training_set():
    import argparse

    from rdml.commands import ensemble as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    cfg, _ = command.build_ensemble_config(parser.parse_args(["--config", "digits-eat", "--members", "1"]))
    assert (cfg.ensemble.members, cfg.ensemble.parts, cfg.ensemble.self_transfer) == (1, 1, "none")
    check_ensemble(cfg)
    cfg, _ = command.build_ensemble_config(parser.parse_args(["--config", "digits-eat", "--members", "1", "--set",
                                                              "ensemble.parts=3"]))
    with pytest.raises(ConfigError, match="2 of the 3 parts"):
        check_ensemble(cfg)


# ------------------------------------------------------------------------------------- a mode added in a test
def dummy_mode() -> type[SelfTransfer]:
    """A new mode in one class: each member trains also on the first images of its own batch, once it has heard
    from every other member. Defined (with its record type) inside a function, so Ray ships both to the actors
    by value: the actors never import this test module."""

    @dataclass
    class Count:
        """The dummy mode's record: how many steps the member took."""

        member: int
        step: int
        steps: int
        schema: int = 1

        @property
        def nbytes(self) -> int:
            return 24

        def check(self) -> Count:
            return self

    @register
    class EchoTransfer(SelfTransfer):
        name = "echo_test"

        def publish(self):
            return Count(self.member.id, self.member.global_step, self.member.global_step)

        def hooks(self, others, state, batch):
            from rdml.defenses.base import ExtraExamples

            assert all(r.step == state.step == r.steps for r in others)
            if len(others) == self.member.cfg.ensemble.members - 1:
                state.extra = ExtraExamples(batch[0][:4], batch[1][:4], weight=0.25)

    return EchoTransfer


def test_a_mode_registered_in_a_test_runs_in_process(splits):
    mode = dummy_mode()
    try:
        assert "echo_test" in registry_values("self_transfer")  # the config accepts it from now on
        cfg = eat_config(self_transfer="echo_test")
        ens = LocalEnsemble(cfg, splits.train)
        metrics = [ens.step(s) for s in range(2)]
        assert all("loss_transfer" in m for row in metrics for m in row)
        assert [type(r).__name__ for r in ens.last_records] == ["Count", "Count"]
        assert all(isinstance(m.transfer, mode) and m.stats_reads == 2 for m in ens.members)
    finally:
        SELF_TRANSFER.pop("echo_test", None)
    with pytest.raises(ConfigError, match="self_transfer"):
        eat_config(self_transfer="echo_test")


# ------------------------------------------------------------------------------------- checked together
@pytest.mark.parametrize(("settings", "message"), [
    ({"ensemble": {"members": 1, "parts": 1, "self_transfer": "ensemble_gradient"}}, "ensemble.members=1"),
    ({"ensemble": {"self_transfer": "cross_member"}, "defense": {"name": "none"}}, "has none"),
    ({"ensemble": {"members": 1, "parts": 3, "self_transfer": "none"}}, "2 of the 3 parts"),
    ({"ensemble": {"self_transfer": "none", "transfer_temperature": 0.5}}, "only used by"),
    ({"ensemble": {"split": "bootstrap", "parts": 5}}, "not used by ensemble.split=bootstrap"),
    ({"ensemble": {"steps_per_epoch": 3}, "train": {"max_steps_per_epoch": 2}}, "remove one of them"),
    ({"loss": {"name": "proxy_anchor"}, "defense": {"name": "hm"}}, "loss.name=triplet"),
    ({"train": {"workers": 2}}, "train.workers=2"),
])
def test_ensemble_settings_are_checked_together(settings, message):
    base = {"defense": {"name": "minmax", "pgd": {"eps": 0.3, "alpha": 0.15, "steps": 2}},
            "ensemble": {"members": 2, "parts": 2, "self_transfer": "ensemble_gradient"}}
    for section, values in settings.items():
        base[section] = {**base.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message):
        check_ensemble(build_config(base))


def test_every_problem_is_reported_at_once_and_defaults_pass():
    cfg = build_config({"ensemble": {"members": 1, "parts": 3, "self_transfer": "cross_member",
                                     "transfer_weight": 0.3}})
    with pytest.raises(ConfigError) as err:
        check_ensemble(cfg)
    text = str(err.value)
    assert "ensemble.members=1" in text and "defense.name=none has none" in text and "2 of the 3 parts" in text
    check_ensemble(build_config({"defense": {"name": "minmax"}}))  # the defaults with minmax members
    check_ensemble(build_config({}))  # clean members, no transfer: an ablation, allowed


def test_steps_per_epoch_larger_than_a_pass_is_refused(splits):
    with pytest.raises(ConfigError, match="more than a member's pass"):
        LocalEnsemble(eat_config(steps_per_epoch=10_000), splits.train)


def test_old_configs_with_ensemble_clean_weight_still_load():
    cfg = build_config({"ensemble": {"clean_weight": 0.0}})  # every checkpoint written before the move has it
    assert "clean_weight" not in cfg.to_dict()["ensemble"]
    with pytest.raises(ConfigError, match="defense.minmax_clean_weight"):
        build_config({"ensemble": {"clean_weight": 0.5}})
    with pytest.raises(ConfigError, match="only used by defense.name=minmax"):
        build_config({"defense": {"name": "act", "minmax_clean_weight": 0.5}})


@pytest.mark.slow
def test_resume_replays_exactly_for_every_mode(tmp_path, splits):
    """Stopped after 3 steps and resumed from the step-2 checkpoint: the same losses as a straight run (records
    of cross_member are part of the checkpoint, snapshots of ensemble_gradient are rebuilt from the weights)."""
    for mode in ("cross_member", "ensemble_gradient"):
        cfg = eat_config(tmp_path, self_transfer=mode, steps_per_epoch=2,
                         train={"epochs": 2, "checkpoint_every": 1})
        straight = train_ensemble(cfg, LocalEnsemble(cfg, splits.train), splits, tmp_path / f"{mode}-a")
        train_ensemble(cfg, LocalEnsemble(cfg, splits.train), splits, tmp_path / f"{mode}-b", stop_after=3)
        resumed = train_ensemble(cfg, LocalEnsemble(cfg, splits.train), splits, tmp_path / f"{mode}-b",
                                 resume=tmp_path / f"{mode}-b")
        assert [h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in straight.history[2:]], mode
        assert np.isfinite(resumed.metrics["ensemble/recall@1"])


def test_runs_of_the_old_member_step_can_be_evaluated_not_resumed(tmp_path, splits):
    """Member files without defense state come from the rdml whose members ignored defense.name: no --resume."""
    from rdml.ensemble import save_ensemble_checkpoint
    from rdml.ensemble.load import load_ensemble_model

    cfg = eat_config(tmp_path, self_transfer="none")
    ens = LocalEnsemble(cfg, splits.train)
    old = [{k: v for k, v in s.items() if k not in ("defense", "transfer")} for s in ens.states()]
    save_ensemble_checkpoint(tmp_path / "old", 0, old, cfg)
    model, _ = load_ensemble_model(tmp_path / "old", dataset=splits.test)  # evaluating it still works
    assert len(model.members) == 2
    with pytest.raises(ConfigError, match="older rdml"):
        train_ensemble(cfg, LocalEnsemble(cfg, splits.train), splits, tmp_path / "old", resume=tmp_path / "old")
