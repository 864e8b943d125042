"""No code runs from a file rdml reads: crafted checkpoints, examples and member files are refused.

Every crafted file carries a payload (``exec`` of code that creates a marker file) that *does* run when
unpickled the unsafe way (checked once below), so the marker's absence proves rdml never unpickled it.
Old checkpoints of the current layout (numpy's RNG state as an ndarray, ensemble indices as ndarrays)
keep loading through the narrow numpy allow-list.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rdml.cli import main
from rdml.config import build_config
from rdml.ensemble.checkpoint import load_manifest, load_member_file
from rdml.errors import RdmlError
from rdml.models import build_model
from rdml.safe_load import load_torch_file
from rdml.train import CheckpointError, fit, load_checkpoint, save_checkpoint
from rdml.train.optim import build_optimizer
from rdml.train.seeding import rng_state, set_rng_state

REFUSED = "contains objects rdml will not unpickle"


class Payload:
    """Unpickling this runs ``exec`` of code that creates ``marker``: what a malicious .pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def crafted_checkpoint(path: Path, marker: Path, config: dict | None = None) -> Path:
    """A file that looks like an rdml checkpoint (torch.save zip) with the payload in its model state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": 1, "config": config or {}, "epoch": 1, "model_state": Payload(marker),
                "in_channels": 1, "image_size": 28}, path)
    return path


def test_the_payload_is_real(tmp_path):
    """Guard for every test below: unpickled unsafely, the crafted file does create its marker."""
    marker = tmp_path / "ran"
    crafted = crafted_checkpoint(tmp_path / "x.pt", marker)
    torch.load(crafted, weights_only=False)
    assert marker.exists()


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "a crafted file's code ran"


def _refused(capsys, file: Path) -> str:
    err = capsys.readouterr().err
    assert REFUSED in err and str(file) in err and "Traceback" not in err, err
    return err


def test_load_checkpoint_refuses_crafted_zip_and_plain_pickle(tmp_path, marker):
    crafted = crafted_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match=REFUSED) as info:
        load_checkpoint(crafted)
    assert "builtins.exec" in str(info.value) and "re-save it from a trusted source" in str(info.value)
    mixed = tmp_path / "mixed.pt"  # the payload next to an old-format numpy RNG state: only the payload is named
    torch.save({"model_state": Payload(marker), "config": {}, "rng_state": {"numpy": np.random.get_state()}}, mixed)
    with pytest.raises(CheckpointError, match=r"will not unpickle \(builtins\.exec\)"):
        load_checkpoint(mixed)
    plain = tmp_path / "evil.pkl"  # a plain pickle, not torch.save's zip
    plain.write_bytes(pickle.dumps({"model_state": Payload(marker), "config": {}}, protocol=2))
    with pytest.raises(CheckpointError, match=REFUSED):
        load_checkpoint(plain)
    plain.write_bytes(pickle.dumps({"model_state": Payload(marker), "config": {}}, protocol=5))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):  # framed: not even parsed
        load_checkpoint(plain)
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("{\"a\": 1}")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(not_torch)


def test_cli_evaluate_and_attack_refuse_a_crafted_checkpoint(tmp_path, marker, capsys):
    crafted = crafted_checkpoint(tmp_path / "evil.pt", marker)
    assert main(["evaluate", str(crafted), "--quiet"]) == 2
    _refused(capsys, crafted)
    assert main(["attack", str(crafted), "--attack", "QA:pm=-:eps=0.03:pgditer=2", "--quiet"]) == 2
    _refused(capsys, crafted)
    run = tmp_path / "run"  # the run-directory form resolves to checkpoints/last.pt
    last = crafted_checkpoint(run / "checkpoints" / "last.pt", marker)
    assert main(["evaluate", str(run), "--quiet"]) == 2
    _refused(capsys, last)


def test_cli_train_refuses_a_crafted_resume_file(tmp_path, marker, capsys):
    crafted = crafted_checkpoint(tmp_path / "runs" / "t" / "checkpoints" / "last.pt", marker)
    assert main(["train", "--resume", str(crafted), "--no-ray"]) == 2
    _refused(capsys, crafted)
    assert main(["train", "--resume", str(tmp_path / "runs" / "t"), "--no-ray"]) == 2
    _refused(capsys, crafted)


def test_cli_report_refuses_crafted_examples_beside_the_json(tmp_path, marker, capsys):
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"recall@1": 0.5, "recall@2": 0.6, "map": 0.3, "nmi": 0.4}))
    examples = evaluation.with_suffix(".examples.pt")
    torch.save({"clean": torch.zeros(1, 1, 28, 28), "attack": Payload(marker)}, examples)
    assert main(["report", str(evaluation), "--out", str(tmp_path / "rep")]) == 2
    err = _refused(capsys, examples)
    assert "delete the file to report without examples" in err
    examples.unlink()  # the same JSON without the crafted file reports fine
    assert main(["report", str(evaluation), "--out", str(tmp_path / "rep")]) == 0
    assert "| eval | 50.0 | 60.0 | 30.0 | 40.0 |" in (tmp_path / "rep" / "report.md").read_text()


def test_examples_file_holding_tensors_and_strings_loads(tmp_path):
    path = tmp_path / "e.examples.pt"
    torch.save({"clean": torch.ones(2, 1, 4, 4), "labels": torch.tensor([1, 2]), "attack": "ES:R"}, path)
    from rdml.eval.report_files import load_examples

    ex = load_examples(path)
    assert ex["attack"] == "ES:R" and ex["labels"].tolist() == [1, 2]
    assert load_examples(tmp_path / "absent.pt") is None


def test_safe_load_names_the_refused_global_and_the_fix(tmp_path, marker):
    crafted = crafted_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(RdmlError, match=r"evil\.pt contains objects rdml will not unpickle \(builtins\.exec\)") as e:
        load_torch_file(crafted, what="thing", fix="pass a thing written by rdml")
    assert "pass a thing written by rdml" in str(e.value)


# ------------------------------------------------------------------------ what rdml writes, old and new
def _old_rng_state() -> dict:
    """The RNG states exactly as checkpoints of the current layout stored them before (numpy as an ndarray)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _old_checkpoint(cfg, path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1, image_size=28)
    save_checkpoint(path, cfg=cfg, model=model, in_channels=1, image_size=28, epoch=1, global_step=5,
                    optimizer=build_optimizer(cfg, model), rng_state=_old_rng_state(),
                    metrics={"train/loss": 0.5}, history=[{"train/loss": 0.5}])
    return path


def test_new_checkpoints_hold_no_unsafe_globals(tiny_config, tmp_path):
    torch.set_num_threads(1)
    model = build_model(tiny_config.model, in_channels=1, image_size=28)
    path = save_checkpoint(tmp_path / "epoch-0001.pt", cfg=tiny_config, model=model, in_channels=1, image_size=28,
                           epoch=1, optimizer=build_optimizer(tiny_config, model), rng_state=rng_state())
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    raw = torch.load(path, weights_only=True)  # no allow-list at all
    assert isinstance(raw["rng_state"]["numpy"]["key"], torch.Tensor)


def test_old_format_checkpoint_loads_restores_rng_and_resumes(tiny_config, tmp_path):
    torch.set_num_threads(1)
    np.random.seed(7)
    old = _old_checkpoint(tiny_config, tmp_path / "run" / "checkpoints" / "epoch-0001.pt")
    expected = np.random.rand(3)  # what numpy draws right after the stored state
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(old))
    assert {"numpy.ndarray", "numpy._core.multiarray._reconstruct"} <= unsafe  # the allow-list is needed...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(old, weights_only=True)  # ...and without it weights_only refuses the file
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.epoch == 1 and isinstance(ckpt.rng_state["numpy"][1], np.ndarray)
    np.random.seed(99)
    set_rng_state(ckpt.rng_state)
    assert np.random.rand(3).tolist() == expected.tolist()
    cfg = build_config(tiny_config.to_dict(), ["train.epochs=2"])
    result = fit(cfg, resume=old)  # resume continues from the old-format file and writes a new-format one
    assert load_checkpoint(result.checkpoint).epoch == 2
    assert torch.serialization.get_unsafe_globals_in_checkpoint(result.checkpoint) == []


def test_numpy1_named_old_checkpoint_loads(tmp_path):
    """numpy 1.x wrote ``numpy.core.multiarray._reconstruct``: the allow-list covers that name too."""
    state = {"model_state": {"w": torch.ones(2)}, "rng": np.random.get_state()}
    path = tmp_path / "np1.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False, pickle_protocol=2)
    data = path.read_bytes()
    assert b"numpy._core.multiarray\n_reconstruct" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct"))
    loaded = load_torch_file(path, what="checkpoint", fix="-", legacy_numpy=True)
    assert loaded["rng"][1].tolist() == state["rng"][1].tolist()
    with pytest.raises(RdmlError, match=REFUSED):
        load_torch_file(path, what="checkpoint", fix="-")  # examples files get no numpy allow-list


# ------------------------------------------------------------------------ ensemble member files
@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory) -> Path:
    """A tiny EAT run (2 members, 2 steps) written by the real command, in process, without tracking."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("eat") / "run"
    assert main(["ensemble", "--config", "digits-eat", "--no-ray", "--no-attacks", "--members", "2",
                 "--run-dir", str(run), "--set", "ensemble.parts=2", "--set", "ensemble.steps_per_epoch=2",
                 "--set", "train.epochs=1", "--set", "data.batch_pairs=8", "--set", "defense.pgd.steps=1",
                 "--set", "tracking.enabled=false"]) == 0
    return run


def test_member_files_are_weights_only_clean(ensemble_run):
    manifest = load_manifest(ensemble_run)
    for k in range(manifest.members):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(manifest.member_file(k)) == []
        assert isinstance(manifest.member_state(k)["indices"], torch.Tensor)


def test_old_format_member_file_loads_into_a_member(ensemble_run, tmp_path):
    from rdml.data import build_datasets
    from rdml.ensemble import Member

    run = tmp_path / "run"
    shutil.copytree(ensemble_run, run)
    manifest = load_manifest(run)
    state = manifest.member_state(1)
    state["indices"] = state["indices"].numpy()  # as Member.state_dict() stored it before
    torch.save(state, manifest.member_file(1))
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(manifest.member_file(1))
    old = load_member_file(manifest.member_file(1))
    assert isinstance(old["indices"], np.ndarray)
    train = build_datasets(manifest.config.data).train
    member = Member(manifest.config, 1, train, old["indices"], steps_per_epoch=1)
    member.load_state_dict(old)
    assert member.global_step == old["steps"] and np.array_equal(member.indices, old["indices"])


def test_crafted_member_file_is_refused_by_evaluate_and_resume(ensemble_run, tmp_path, marker, capsys):
    run = tmp_path / "run"
    shutil.copytree(ensemble_run, run)
    member = load_manifest(run).member_file(0)
    torch.save({"member": 0, "model": Payload(marker)}, member)
    assert main(["evaluate", str(run), "--quiet"]) == 2
    _refused(capsys, member)
    assert main(["evaluate", str(member), "--quiet"]) == 2
    _refused(capsys, member)
    assert main(["ensemble", "--resume", str(run), "--no-ray", "--no-attacks"]) == 2
    _refused(capsys, member)
