"""Packaging in the development venv: shipped Tune spaces by name, torchvision after ``import rdml``,
the extras' error messages, and pyproject's lower bounds = the verified pins of constraints.txt.

The fresh-venv install next to a user's own torch is ``tests/test_install.py`` (slow).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from rdml.errors import ConfigError, RdmlError
from rdml.extras import EXTRAS, MissingExtraError, message, missing_extra, require
from rdml.tune.space import load_space, resolve_space, shipped_spaces

REPO = Path(__file__).resolve().parents[1]


def test_shipped_spaces_resolve_by_name_from_any_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no tune_spaces/ here: the names must come from the package
    found = shipped_spaces()
    assert sorted(found) == sorted(p.stem for p in (REPO / "tune_spaces").glob("*.yaml"))
    for name, path in found.items():
        assert path.read_bytes() == (REPO / "tune_spaces" / f"{name}.yaml").read_bytes()
    space, base = load_space("hm_schedules")
    assert space.name == "hm_schedules" and base.data.name == "digits"
    # the README's spelling works outside a checkout too
    assert resolve_space("tune_spaces/eat_modes.yaml") == found["eat_modes"]
    with pytest.raises(ConfigError, match="hm_schedules"):  # the message lists the shipped names
        load_space("hm_schedule")


def test_a_space_file_in_the_current_directory_wins(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tune_spaces").mkdir()
    own = tmp_path / "tune_spaces" / "hm_schedules.yaml"
    own.write_text((REPO / "tune_spaces" / "ics_weight.yaml").read_text())
    assert resolve_space("tune_spaces/hm_schedules.yaml") == Path("tune_spaces/hm_schedules.yaml")
    space, _ = load_space("tune_spaces/hm_schedules.yaml")
    assert space.name == "ics_weight"


def test_import_rdml_makes_torchvision_importable_without_importing_it() -> None:
    code = (
        "import sys\n"
        "import rdml\n"
        "from rdml._torchvision_compat import _HOOK\n"
        "assert 'torchvision' not in sys.modules, 'import rdml imported torchvision'\n"
        "assert _HOOK in sys.meta_path\n"
        "import torchvision\n"
        "assert _HOOK not in sys.meta_path, 'the one-shot hook stayed installed'\n"
        "torchvision.models.resnet18()\n"
        "from torchvision.transforms import v2\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_missing_extra_names_the_install_command(module: str) -> None:
    err = missing_extra(ModuleNotFoundError(f"No module named '{module}'", name=f"{module}.sub"))
    assert isinstance(err, MissingExtraError) and isinstance(err, RdmlError)
    text = str(err)
    assert text.startswith(f"{module} is not installed") and "pip install" in text
    expected = {"ray": "rdml[ray]", "mlflow": "rdml[mlflow]", "faiss": "rdml[cpu]",
                "torchvision": "'torchvision==0.28.*'"}[module]  # torch 2.13 pairs with torchvision 0.28
    assert expected in text, text
    require(module)  # installed in the development venv: no error


def test_other_missing_modules_are_not_turned_into_extras() -> None:
    assert missing_extra(ModuleNotFoundError("No module named 'raytracer'", name="raytracer")) is None
    assert missing_extra(ModuleNotFoundError("no name")) is None
    with pytest.raises(MissingExtraError, match=r"rdml\[mlflow\]"):
        raise MissingExtraError(message("mlflow"))


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_lower_bounds_are_the_verified_pins() -> None:
    """Every dependency's lower bound in pyproject.toml is exactly its pin in constraints.txt."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins()
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra, reqs in project["optional-dependencies"].items()
                     for r in reqs if not r.startswith("rdml[")]
    assert {"torch", "mlxtend", "ray", "mlflow", "torchvision", "faiss-cpu"} <= {r.name for r in requirements}
    for req in requirements:
        name = req.name.lower()
        assert name in pins, f"{name} has no pin in constraints.txt"
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert lower == [pins[name]], f"{req}: lower bound should be the verified {pins[name]}"
        assert req.specifier.contains(pins[name]), req
        assert not [s for s in req.specifier if s.operator == "=="], f"{req}: an exact pin belongs in constraints.txt"
    assert all(r.name not in ("ray", "mlflow", "torchvision") for r in map(Requirement, project["dependencies"]))
    # the local torch wheel is 2.13.0+cpu: the pin must leave the local label open
    assert pins["torch"] == "2.13.0" and Requirement("torch>=2.13.0").specifier.contains("2.13.0+cpu")
