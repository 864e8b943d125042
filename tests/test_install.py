"""``pip install rdml[cpu]`` next to a user's own torch, in a fresh virtual environment (issue 12).

One test, in the order a user goes: a new venv, their torch first (``pip install torch==2.13.0``, the
local CPU wheel), then ``pip install ./rdml[cpu]`` without the ``[ray]``/``[mlflow]``/``[vision]``
extras. It checks that pip neither reinstalls nor changes torch, that ``import rdml`` works and sets
``rdml.__version__``, that the shipped Tune spaces resolve by name from the installed package (not the
source tree), and that the commands needing a missing extra name it (exit 2, no traceback). Then the
user adds the torchvision that pairs with their torch: torch is still untouched, and ``import rdml;
import torchvision`` works (on this CPU torch a plain ``import torchvision`` fails). Finally it runs
``tests/api_examples.py`` (the runner of docs/api.md's code blocks) there when that file exists.

The rdml install uses ``constraints.txt`` minus torch and torchvision: the other versions are the
verified ones (reproducible, served from pip's cache), while torch is left entirely to pip and the
ranges in pyproject.toml, which is what this test is about (a hard torchvision dependency, or a
range that 2.13.0 does not satisfy, would make pip replace torch here). The build runs on a copy of
the checkout (tracked and not-ignored files, as a clean clone has them) so that setuptools' in-tree
``build/`` and ``*.egg-info`` never touch the working tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
API_EXAMPLES = "tests/api_examples.py"  # executes docs/api.md's code blocks; exit status 0 = all ran

pytestmark = pytest.mark.slow


def _pin(name: str) -> str:
    """The exact requirement for ``name`` in constraints.txt (e.g. ``torch==2.13.0``)."""
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.strip()
    raise AssertionError(f"constraints.txt pins no {name}")


def _env() -> dict[str, str]:
    """This environment without anything that would leak the outer venv or the checkout into the new one."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _copy_checkout(dest: Path) -> Path:
    """The files a clean clone of this working tree has (tracked, plus untracked ones git does not ignore)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the working tree is listed but absent
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _torch_state(python: Path, cwd: Path) -> dict[str, object]:
    """torch's version, its installed files' record and its __init__'s inode/mtime: any reinstall changes them."""
    code = (
        "import importlib.metadata as m, json, os, hashlib\n"
        "d = m.distribution('torch')\n"
        "init = d.locate_file('torch/__init__.py')\n"
        "st = os.stat(init)\n"
        "record = hashlib.sha256(d.read_text('RECORD').encode()).hexdigest()\n"
        "print(json.dumps({'version': d.version, 'record': record, 'init': str(init),\n"
        "                  'inode': st.st_ino, 'mtime_ns': st.st_mtime_ns}))\n"
    )
    return json.loads(_run([str(python), "-c", code], cwd).stdout)


def _freeze(python: Path, cwd: Path, name: str) -> str:
    lines = _run([str(python), "-m", "pip", "freeze"], cwd).stdout.splitlines()
    return next((line for line in lines if line.lower().startswith(f"{name}==")), "")


def test_pip_install_next_to_users_torch(tmp_path: Path) -> None:
    torch_pin, vision_pin = _pin("torch"), _pin("torchvision")
    src = _copy_checkout(tmp_path / "src")
    work = tmp_path / "work"  # an empty cwd: neither the checkout nor its copy is importable from here
    work.mkdir()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], work)
    python, pip = venv / "bin" / "python", [str(venv / "bin" / "python"), "-m", "pip", "--no-input"]
    _run([*pip, "install", "--quiet", "-c", str(REPO / "constraints.txt"), "--upgrade", "pip"], work)

    # the user's torch; where it is not a local file (another machine) this would download gigabytes
    report = tmp_path / "torch.json"
    _run([*pip, "install", "--dry-run", "--quiet", "--no-deps", "--report", str(report), torch_pin], work)
    url = json.loads(report.read_text())["install"][0]["download_info"]["url"]
    if not url.startswith("file://"):
        pytest.skip(f"{torch_pin} is not a local wheel here ({url}); not downloading a CUDA build for this test")
    # --no-compile here and below: byte-compiling torch's thousands of files is slow and not under test
    _run([*pip, "install", "--quiet", "--no-compile", torch_pin], work)
    before, frozen_before = _torch_state(python, work), _freeze(python, work, "torch")

    # rdml without extras; torch and torchvision are left to pip and pyproject's ranges
    constraints = tmp_path / "constraints-without-torch.txt"
    constraints.write_text("\n".join(
        line for line in (REPO / "constraints.txt").read_text().splitlines()
        if not line.lower().startswith(("torch==", "torchvision=="))
    ) + "\n")
    installed = _run([*pip, "install", "--no-compile", "-c", str(constraints), f"{src}[cpu]"], work)
    collected = [line.split(": ", 1)[1].split(", ") for line in installed.stdout.splitlines()
                 if line.startswith("Installing collected packages: ")]
    assert collected and "rdml" in collected[0] and "torch" not in collected[0], collected
    assert _torch_state(python, work) == before, "pip install rdml[cpu] reinstalled or changed torch"
    assert _freeze(python, work, "torch") == frozen_before
    for extra_module in ("ray", "mlflow", "torchvision"):
        assert _run([str(python), "-c", f"import {extra_module}"], work, check=False).returncode != 0, (
            f"{extra_module} got installed without its extra")
    _run([*pip, "check"], work)

    # import rdml, its version, the shipped spaces by name from site-packages, the torchvision hint
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    spaces = sorted(p.stem for p in (REPO / "tune_spaces").glob("*.yaml"))
    probe = (
        "import json, sys\n"
        "import rdml\n"
        "assert 'torchvision' not in sys.modules\n"
        "from rdml.tune.space import load_space, shipped_spaces\n"
        "found = shipped_spaces()\n"
        "space, base = load_space('hm_schedules')\n"
        "from rdml._torchvision_compat import import_torchvision\n"
        "from rdml.extras import MissingExtraError\n"
        "try:\n"
        "    import_torchvision()\n"
        "    hint = None\n"
        "except MissingExtraError as err:\n"
        "    hint = str(err)\n"
        "print(json.dumps({'version': rdml.__version__, 'file': rdml.__file__, 'hint': hint,\n"
        "                  'spaces': {k: str(v) for k, v in found.items()}, 'loaded': space.source,\n"
        "                  'base': base.data.name}))\n"
    )
    info = json.loads(_run([str(python), "-c", probe], work).stdout)
    site = Path(info["file"]).parent
    assert site.is_relative_to(venv), info["file"]
    assert info["version"] == version
    assert sorted(info["spaces"]) == spaces
    for name, path in info["spaces"].items():
        assert Path(path).is_relative_to(site), path
        assert Path(path).read_bytes() == (REPO / "tune_spaces" / f"{name}.yaml").read_bytes()
    assert Path(info["loaded"]).is_relative_to(site) and info["base"] == "digits"
    shipped = {p.relative_to(src / "rdml") for p in (src / "rdml").rglob("*")
               if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts}
    missing = sorted(str(p) for p in shipped if not (site / p).is_file())
    assert not missing, f"files of rdml/ missing from the installed package: {missing}"
    assert info["hint"] and "torchvision==0.28.*" in info["hint"], info["hint"]

    # the commands that need a missing extra name it
    rdml = str(venv / "bin" / "rdml")
    assert _run([rdml, "--version"], work).stdout.strip() == f"rdml {version}"
    for cmd, extra in ((["tune", "--space", "hm_schedules", "--samples", "1"], "rdml[ray]"),
                       (["train", "--config", "digits", "--set", "train.epochs=1"], "rdml[mlflow]"),
                       (["ui", "--dry-run"], "rdml[mlflow]")):
        proc = _run([rdml, *cmd], work, check=False)
        assert proc.returncode == 2 and extra in proc.stderr and "Traceback" not in proc.stderr, (
            cmd, proc.returncode, proc.stderr[-2000:])

    # the user adds the torchvision paired with their torch: torch stays, and it imports after rdml
    _run([*pip, "install", "--quiet", "--no-compile", vision_pin], work)
    assert _torch_state(python, work) == before, f"pip install {vision_pin} changed torch"
    after_rdml = _run([str(python), "-c", "import rdml, torchvision; torchvision.models.resnet18()"], work, check=False)
    assert after_rdml.returncode == 0, after_rdml.stderr[-3000:]

    # docs/api.md's examples, run against the installed package (the script's own dir is tests/)
    if (src / API_EXAMPLES).is_file():
        _run([str(python), str(src / API_EXAMPLES)], src, timeout=600)
    shutil.rmtree(venv)  # 1 GB; kept only when the test fails (pytest keeps the last runs' tmp dirs)

