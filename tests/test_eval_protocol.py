"""One evaluation protocol: the same In-Shop checkpoint gets the same R@1 from every evaluation path.

The fixture is a small In-Shop data set in the real on-disk layout (``Eval/list_eval_partition.txt`` and
``Img/img/...`` JPEGs, as tests/test_data.py writes it), with images that carry their item's colour so a
briefly trained model retrieves better than chance. A C2F2 model is trained on it for a few steps with
:func:`rdml.train.fit` (training's own evaluation reports ``eval/recall@1``); the checkpoint is then
evaluated by ``rdml evaluate`` (the CLI, in-process), by :func:`rdml.evaluate` and, once the ensemble
calls the protocol, by the ensemble's evaluation. In-Shop is evaluated query-to-gallery; the fixture is
built so that the whole-test-set protocol gives a different R@1, so a path that used it would fail here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rdml
from rdml.cli import main as cli_main
from rdml.config import build_config
from rdml.data import DatasetSplits, build_datasets
from rdml.errors import DataError
from rdml.eval import embed, evaluation_sets, retrieval_metrics
from rdml.train import fit, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_ITEMS, TEST_ITEMS, PER_STATUS = (1, 2, 7, 8, 9, 10), (3, 4, 5, 6, 11, 12, 13, 14), 3


def write_item_image(path: Path, colour: np.ndarray, seed: int) -> None:
    """A 40x40 JPEG: the item's colour plus per-image noise and a random bright square."""
    rng = np.random.default_rng(seed)
    img = np.clip(colour[None, None, :] + rng.normal(0, 45, (40, 40, 3)), 0, 255)
    r, c = rng.integers(0, 28, 2)
    img[r : r + 12, c : c + 12] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.astype(np.uint8)).save(path)


def make_inshop(root: Path) -> Path:
    """``Eval/list_eval_partition.txt`` + ``Img/img/WOMEN/<category>/id_XXXXXXXX/*.jpg`` (the DeepFashion layout)."""
    rng = np.random.default_rng(0)
    rows, k = [], 0
    spec = [("train", item, j) for item in TRAIN_ITEMS for j in range(2 * PER_STATUS)]
    spec += [(status, item, j) for item in TEST_ITEMS for status in ("query", "gallery") for j in range(PER_STATUS)]
    colours = {item: rng.uniform(40, 215, 3) for item in TRAIN_ITEMS + TEST_ITEMS}
    for status, item, j in spec:
        k += 1
        rel = f"img/WOMEN/{'Dresses' if item % 2 else 'Tees_Tanks'}/id_{item:08d}/{j:02d}_{status}_{k}_front.jpg"
        write_item_image(root / "Img" / rel, colours[item], 100 + k)
        rows.append(f"{rel}  id_{item:08d}  {status}")
    (root / "Eval").mkdir(parents=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    )
    return root


@pytest.fixture(scope="module")
def inshop_run(tmp_path_factory):
    """(config, splits, training result) of a few training steps on the In-Shop fixture."""
    tmp = tmp_path_factory.mktemp("inshop")
    root = make_inshop(tmp / "data")
    cfg = build_config({
        "name": "inshop-protocol",
        "data": {"name": "inshop", "root": str(root), "image_size": 32, "batch_pairs": 6, "eval_batch_size": 16},
        "model": {"arch": "c2f2", "embedding_dim": 16},
        "train": {"epochs": 1, "max_steps_per_epoch": 4, "output_dir": str(tmp / "runs"), "seed": 0},
        "eval": {"profile": None},
        "tracking": {"enabled": False},
    })
    result = fit(cfg, run_dir=tmp / "run", device="cpu", progress=False)
    return cfg, build_datasets(cfg.data), result


def test_protocol_choice():
    class Plain:
        test, query, gallery = "test", None, None

    class Inshop:
        test, query, gallery = "test", [1, 2], [3]

    assert evaluation_sets(Plain()) == ("test", None)
    assert evaluation_sets(Inshop()) == ([1, 2], [3])
    Inshop.gallery = []
    with pytest.raises(DataError, match="data.limit_test"):
        evaluation_sets(Inshop())


def test_inshop_checkpoint_gets_one_recall_at_1_from_every_path(inshop_run, tmp_path):
    cfg, splits, result = inshop_run
    assert isinstance(splits, DatasetSplits) and splits.query is not None
    queries, gallery = evaluation_sets(splits)
    assert (len(queries), len(gallery), len(splits.test)) == (24, 24, 48)

    model, _ = load_model(result.checkpoint, device="cpu")
    q, qy = embed(model, queries, batch_size=16)
    g, gy = embed(model, gallery, batch_size=16)
    expected = retrieval_metrics(q, qy, g, gy)["recall@1"]
    whole = retrieval_metrics(*embed(model, splits.test, batch_size=16))["recall@1"]
    assert expected != whole  # the fixture tells the two protocols apart

    # training's evaluation (the last epoch, the checkpointed weights)
    assert result.metrics["eval/recall@1"] == expected
    # `rdml evaluate` (CLI, in-process)
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", str(result.checkpoint), "--json", str(out), "--intervals", "0", "--quiet"]) == 0
    assert json.loads(out.read_text())["recall@1"] == expected
    # rdml.evaluate, given the splits (the protocol picks the sets) or the sets themselves
    assert rdml.evaluate(model, splits, intervals=0, device="cpu").metrics["recall@1"] == expected
    assert rdml.evaluate(model, queries, gallery, intervals=0, device="cpu").metrics["recall@1"] == expected
    # the metrics besides R@1 agree with training's as well (mAP over all positives, clustering)
    cli = json.loads(out.read_text())
    for key in ("map", "map@r", "nmi"):
        assert cli[key] == pytest.approx(result.metrics[f"eval/{key}"], abs=1e-12), key


def test_inshop_attacks_run_query_to_gallery(inshop_run):
    """The robustness path of `rdml evaluate --profile`: attacked queries come from the query set and
    search the gallery (its benign R@1 is the query-to-gallery one)."""
    from rdml.commands.evaluate import evaluate_checkpoint

    cfg, splits, result = inshop_run
    _, run, _ = evaluate_checkpoint(result.checkpoint, "quick", intervals=0, progress=False)
    rob = run.robustness
    queries, _ = evaluation_sets(splits)
    assert rob.indices.max() < len(queries) and len(rob.indices) == len(queries)
    assert rob.benign_recall_at_1 == run.metrics["recall@1"]
    assert "ers" in run.metrics


def test_inshop_ensemble_path_gets_the_same_recall_at_1(inshop_run):
    from rdml.ensemble import EnsembleModel, evaluate_ensemble

    cfg, splits, result = inshop_run
    model, _ = load_model(result.checkpoint, device="cpu")
    queries, gallery = evaluation_sets(splits)
    metrics = evaluate_ensemble(EnsembleModel([model]), queries, cfg, "cpu", gallery=gallery)
    assert metrics["member_0/recall@1"] == result.metrics["eval/recall@1"]
    assert metrics["ensemble/recall@1"] == result.metrics["eval/recall@1"]
