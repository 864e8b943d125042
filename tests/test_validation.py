"""Bad command-line options and config values are refused at once (exit 2), naming the option or key, the
allowed values and the fix; devices torch cannot use are a clear error; `rdml --version`."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from rdml.cli import main
from rdml.config import build_config, load_config
from rdml.errors import ConfigError
from rdml.train import resolve_device


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr of `rdml ARGV` (argparse errors exit through SystemExit)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["attack", "x.pt", "-A", "QA:pm=-:M=1", "--batch-size", "0"], ["--batch-size", ">= 1", "got 0"]),
        (["attack", "x.pt", "-A", "QA:pm=-:M=1", "--max-queries", "0"], ["--max-queries", ">= 1"]),
        (["attack", "x.pt", "-A", "QA:pm=-:M=1", "--seed", "-1"], ["--seed", ">= 0"]),
        (["attack", "x.pt", "-A", "QA:pm=-:M=1", "--batch-size", "many"], ["--batch-size", "'many'"]),
        (["evaluate", "x.pt", "--batch-size", "0"], ["--batch-size", ">= 1", "got 0"]),
        (["evaluate", "x.pt", "--max-queries", "0"], ["--max-queries", ">= 1"]),
        (["evaluate", "x.pt", "--seed", "-1"], ["--seed", ">= 0"]),
        (["evaluate", "x.pt", "--intervals", "-1"], ["--intervals", ">= 0"]),
        (["leaderboard", "cards", "--sort", "speed"], ["--sort", "invalid choice"]),
        (["train", "--workers", "0"], ["--workers", ">= 1", "train.workers"]),
        (["train", "--epochs", "0"], ["--epochs", ">= 1"]),
        (["train", "--seeds", "0"], ["--seeds", ">= 1"]),
    ],
)
def test_bad_options_are_refused_with_the_allowed_range(capsys, argv, fragments):
    code, err = run_cli(capsys, *argv)
    assert code == 2
    for fragment in fragments:
        assert fragment in err


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("train.epochs=0", ["train.epochs: must be >= 1, got 0", "--set train.epochs=VALUE"]),
        ("train.seed=-5", ["train.seed: must be >= 0, got -5"]),
        ("train.workers=0", ["train.workers: must be > 0"]),
        ("train.lr=.inf", ["train.lr", "finite"]),
        ("defense.pgd.eps=5", ["eps=5", "[0,1]", "8/255"]),
        ("data.eval_batch_size=0", ["data.eval_batch_size"]),
        ("data.train_classes=[]", ["data.train_classes"]),
        ("eval.attack_seed=-1", ["eval.attack_seed: must be >= 0"]),
        ("eval.max_queries=0", ["eval.max_queries"]),
        ("ensemble.members=0", ["ensemble.members"]),
        ("ray.num_cpus=0", ["ray.num_cpus"]),
        ("tracking.experiment=''", ["tracking.experiment"]),
    ],
)
def test_bad_config_values_fail_before_anything_starts(tmp_path, capsys, override, fragments):
    code, err = run_cli(capsys, "train", "--no-ray", "--set", f"train.output_dir={tmp_path / 'runs'}",
                        "--set", override)
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "runs").exists()


def test_pixel_budgets_accept_fractions():
    cfg = load_config(None, ["defense.name=act", "defense.pgd.eps=8/255", "defense.pgd.alpha=2/255",
                             "defense.pgd.steps=8"])
    assert cfg.defense.pgd.eps == pytest.approx(8 / 255) and cfg.defense.pgd.alpha == pytest.approx(2 / 255)
    assert build_config({"defense": {"pgd": {"eps": "77/255", "alpha": "auto"}}}).defense.pgd.eps == pytest.approx(77 / 255)


def test_devices_torch_cannot_use_are_config_errors():
    cfg = build_config({})
    assert resolve_device(cfg, "cpu") == torch.device("cpu")
    assert resolve_device(cfg, "auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="not a device torch knows"):
        resolve_device(cfg, "gpu0")
    with pytest.raises(ConfigError, match="not supported"):
        resolve_device(cfg, "meta")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match="--device cpu" if count == 0 else "does not exist"):
        resolve_device(cfg, f"cuda:{count + 3}" if count else "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_evaluate_device_cuda_on_a_cpu_machine_is_a_clear_error(tmp_path, capsys):
    from rdml.train import fit

    cfg = build_config({"data": {"batch_pairs": 8, "limit_test": 100}, "model": {"embedding_dim": 16},
                        "train": {"epochs": 1, "max_steps_per_epoch": 1, "output_dir": str(tmp_path)},
                        "tracking": {"enabled": False}})
    ckpt = fit(cfg, run_dir=tmp_path / "run").checkpoint
    code, err = run_cli(capsys, "evaluate", str(ckpt), "--device", "cuda")
    assert code == 2 and "Traceback" not in err
    assert "no CUDA device" in err and "--device cpu" in err


def test_evaluate_track_checks_the_store_before_evaluating(tmp_path, capsys):
    """An unreachable tracking server fails at once, before the attacks (the results are not lost after them)."""
    import time

    from rdml.train import fit

    cfg = build_config({"data": {"batch_pairs": 8, "limit_test": 100}, "model": {"embedding_dim": 16},
                        "train": {"epochs": 1, "max_steps_per_epoch": 1, "output_dir": str(tmp_path)},
                        "tracking": {"uri": "http://127.0.0.1:9"}})
    ckpt = fit(cfg, run_dir=tmp_path / "run").checkpoint
    t0 = time.perf_counter()
    code = main(["evaluate", str(ckpt), "--profile", "rob28", "--track"])
    out = capsys.readouterr()
    assert code == 2 and "Traceback" not in out.err and "127.0.0.1:9" in out.err
    assert "evaluating" not in out.out and time.perf_counter() - t0 < 30  # rob28 on 100 queries takes minutes


def test_resume_with_nothing_left_to_train_and_seeds_with_resume(tmp_path, capsys):
    from rdml.train import fit

    cfg = build_config({"data": {"batch_pairs": 8, "limit_test": 100}, "model": {"embedding_dim": 16},
                        "train": {"epochs": 1, "max_steps_per_epoch": 1, "output_dir": str(tmp_path)},
                        "tracking": {"enabled": False}})
    fit(cfg, run_dir=tmp_path / "run")
    code, err = run_cli(capsys, "train", "--no-ray", "--resume", str(tmp_path / "run"))
    assert code == 2 and "nothing left to train" in err and "--epochs N with N > 1" in err
    code, err = run_cli(capsys, "train", "--seeds", "2", "--resume", str(tmp_path / "run"))
    assert code == 2 and "--seeds and --resume" in err


def test_version(capsys, monkeypatch):
    import rdml

    assert rdml.__version__ == importlib.metadata.version("rdml")
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rdml {rdml.__version__}"

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert rdml._version() == "0+unknown"  # a checkout that was never installed still imports


def test_table_title_names_the_test_protocol():
    from rdml.commands.train import split_title

    def title(**data):
        return split_title(build_config({"data": data}))

    assert "zero-shot" in title(name="digits")
    assert "zero-shot" not in title(name="digits", split="same_classes")
    assert "zero-shot" not in title(name="mnist5k")
    assert "zero-shot" in title(name="mnist5k", split="zero_shot")
    assert "zero-shot" not in title(name="mnist", root=str(Path("/nonexistent")))
    assert "zero-shot" in title(name="cub")
