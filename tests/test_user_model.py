"""Bring your own model: `rdml evaluate --model package.module:factory [--weights FILE]` and TorchScript files,
with the data set from --data; every mistake is a one-line error that names the fix (exit 2)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import rdml
from rdml.cli import main
from rdml.config import build_config
from rdml.data import build_datasets

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE = '''
import torch
from torch import nn


class UserNet(nn.Module):
    """Not normalised on purpose: rdml puts the embeddings on the unit sphere."""

    def __init__(self, dim=16):
        super().__init__()
        self.fc = nn.Linear(28 * 28, dim)

    def forward(self, x):
        return self.fc(x.flatten(1))


def build():
    torch.manual_seed(0)
    return UserNet()


def broken():
    return "not a model"


def needs_args(dim):
    return UserNet(dim)
'''
FAST = ["--profile", "quick", "--max-queries", "8", "--intervals", "0", "--quiet"]


@pytest.fixture
def usermod(tmp_path, monkeypatch):
    pkg = tmp_path / "usermods"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()
    return importlib.import_module("usermods.nets")


@pytest.fixture(scope="module")
def digits_test():
    return build_datasets(build_config({}).data).test


def test_factory_weights_and_torchscript_give_the_library_numbers(usermod, digits_test, tmp_path):
    trained = usermod.build()
    with torch.no_grad():
        trained.fc.weight.mul_(-3.0)  # weights that differ from the factory's own initialisation
    weights = tmp_path / "w.pt"
    torch.save(trained.state_dict(), weights)
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", "usermods.nets:build", "--weights", str(weights), "--data", "digits",
                 "--json", str(out), *FAST]) == 0
    metrics = json.loads(out.read_text())
    expected = rdml.evaluate(trained, digits_test, profile="quick", max_queries=8, intervals=0, batch_size=256)
    for key in ("recall@1", "map", "nmi", "ers", "attacks.QA-", "esd_driven"):
        assert metrics[key] == pytest.approx(expected.metrics[key], abs=1e-9), key
    plain = tmp_path / "plain.json"  # without --weights: the factory's own initialisation, other numbers
    assert main(["evaluate", "--model", "usermods.nets:build", "--data", "digits", "--json", str(plain), *FAST]) == 0
    assert json.loads(plain.read_text())["ers"] != metrics["ers"]
    scripted = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(trained), str(scripted))
    ts = tmp_path / "ts.json"
    assert main(["evaluate", "--model", str(scripted), "--data", "digits", "--json", str(ts), *FAST]) == 0
    assert json.loads(ts.read_text())["recall@1"] == pytest.approx(metrics["recall@1"], abs=1e-9)
    assert main(["attack", "--model", "usermods.nets:build", "--data", "digits", "--attack",
                 "QA:pm=-:eps=8/255:pgditer=2", "--max-queries", "4", "--quiet"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["--model", "nosuchpkg.nets:build", "--data", "digits"], "cannot import 'nosuchpkg.nets'"),
    (["--model", "usermods.nets:missing", "--data", "digits"], "has no attribute 'missing'"),
    (["--model", "usermods.nets:broken", "--data", "digits"], "returned a str, not a torch.nn.Module"),
    (["--model", "usermods.nets:needs_args", "--data", "digits"], "without arguments"),
    (["--model", "usermods.nets:build"], "--data NAME"),
    (["--data", "digits"], "go with --model"),
    (["--model", "no/such/file.ts", "--data", "digits"], "neither an import path nor a file"),
])
def test_user_model_mistakes_name_the_fix(usermod, argv, message, capsys):
    assert main(["evaluate", *argv, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_bad_weights_and_files_are_refused(usermod, tmp_path, capsys):
    other = torch.nn.Linear(3, 2)
    wrong = tmp_path / "wrong.pt"
    torch.save(other.state_dict(), wrong)
    assert main(["evaluate", "--model", "usermods.nets:build", "--weights", str(wrong), "--data", "digits",
                 "--quiet"]) == 2
    assert "do not fit the model built by usermods.nets:build" in capsys.readouterr().err
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    evil = tmp_path / "evil.pt"
    torch.save({"fc.weight": Payload()}, evil)
    assert main(["evaluate", "--model", "usermods.nets:build", "--weights", str(evil), "--data", "digits",
                 "--quiet"]) == 2
    assert "will not unpickle" in capsys.readouterr().err and not marker.exists()
    not_ts = tmp_path / "weights.pt"
    torch.save(usermod.build().state_dict(), not_ts)
    assert main(["evaluate", "--model", str(not_ts), "--data", "digits", "--quiet"]) == 2
    assert "not a TorchScript archive" in capsys.readouterr().err
