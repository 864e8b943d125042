"""Run one attack on a model, e.g. --attack 'QA:pm=-:M=1:eps=8/255:alpha=3/255:pgditer=32'.

The model is any path `rdml evaluate` takes: a training checkpoint or run directory, an EAT ensemble run
directory (the combined embedding, attacked end to end) or one of its member files; or a model rdml did
not train, --model package.module:factory [--weights FILE] or --model FILE.ts, with --data NAME.
The attack runs as an attack object (rdml.attacks), through the same code as `rdml evaluate`.

Spec grammar (RobRank's, plus ours): KIND[:key=value]*, KIND in CA, QA, SPQA (with pm=+ or -), TMA,
ES, LTM, GTM, GTT, PANUM, CENTROID, SHIFT; keys W, M, eps, alpha, pgditer, norm (linf|l2), rs
(random start), restarts, centroids (class|kmeans), dynamic, margin, exclude_self, xi_k. Prints the
reported numbers; --save-images DIR writes the adversarial images (adv.pt with clean, adv, indices)
and a PNG grid of clean vs adversarial images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rdml.commands.options import at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rdml.commands.evaluate import add_model_arguments

    parser.add_argument("checkpoint", nargs="?", default=None,
                        help="checkpoint file or run directory of `rdml train`; run directory (or manifest.json) of "
                             "`rdml ensemble`, or one of its step-*/member-k.pt (or --model)")
    add_model_arguments(parser)
    parser.add_argument("--attack", "-A", required=True, help="attack spec, e.g. 'QA:pm=-:M=1:eps=0.03137:pgditer=32'")
    parser.add_argument("--max-queries", type=at_least(1, "test samples to attack"), default=None,
                        help="attack at most N (seeded) test samples")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps or auto (default: train.device)")
    parser.add_argument("--batch-size", type=at_least(1, "queries per attack batch"), default=None)
    parser.add_argument("--seed", type=at_least(0, "attack target seed"), default=None)
    parser.add_argument("--save-images", default=None, metavar="DIR", help="save adversarial images (.pt + PNG grid)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the numbers to this JSON file")
    parser.add_argument("--quiet", action="store_true")


def save_images(clean, adv, indices, out_dir: Path, columns: int = 16) -> list[Path]:
    """adv.pt (clean, adv, indices) and grid.png: clean images on odd rows, adversarial on even rows."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    pt = out_dir / "adv.pt"
    torch.save({"clean": clean, "adv": adv, "indices": torch.as_tensor(indices)}, pt)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(columns, len(adv))
    fig, axes = plt.subplots(3, n, figsize=(1.2 * n, 3.8), squeeze=False)
    for j in range(n):
        delta = (adv[j] - clean[j]).abs()
        for i, img in enumerate((clean[j], adv[j], delta / max(float(delta.max()), 1e-12))):
            ax = axes[i][j]
            ax.imshow(img.squeeze(0) if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
    axes[0][0].set_title("clean", fontsize=7, loc="left")
    axes[1][0].set_title("adversarial", fontsize=7, loc="left")
    axes[2][0].set_title("|delta| (scaled)", fontsize=7, loc="left")
    fig.tight_layout()
    png = out_dir / "grid.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [pt, png]


def run(args: argparse.Namespace) -> int:
    import torch

    from rdml.attacks.inputs import prepare_model
    from rdml.attacks.profiles import single_attack_profile
    from rdml.commands.evaluate import user_model_source
    from rdml.data import build_datasets
    from rdml.ensemble.load import load_any_model
    from rdml.errors import ConfigError
    from rdml.eval.protocol import evaluation_sets
    from rdml.eval.robustness import evaluate_robustness
    from rdml.train import resolve_device

    profile = single_attack_profile(args.attack)
    spec = profile.attacks[0]
    if (args.checkpoint is None) == (args.model is None):
        raise ConfigError("pass either a checkpoint (or run directory) or --model package.module:factory --data NAME")
    if args.model is None and (args.weights or args.data or args.config):
        raise ConfigError("--weights, --data and --config go with --model (a model rdml did not train); a checkpoint "
                          "brings its own config and data set")
    if args.model is not None:
        loaded = user_model_source(args.model, args.weights, args.data, args.config)
    else:
        loaded = load_any_model(args.checkpoint, device="cpu")
    model, cfg = loaded.model, loaded.config
    if not args.quiet:
        print(f"attacking {loaded.description}")
    dev = resolve_device(cfg, args.device)
    test, gallery = evaluation_sets(build_datasets(cfg.data))  # In-Shop: its queries against its gallery
    if args.model is not None:  # a user's model: check it and put its embeddings on the unit sphere if needed
        model = prepare_model(model, test if gallery is None else gallery, None,
                              args.batch_size or cfg.data.eval_batch_size, dev)
    keep = args.save_images is not None and spec.threat == "ranking"
    result = evaluate_robustness(
        model, test, profile, device=dev, seed=cfg.eval.attack_seed if args.seed is None else args.seed,
        max_queries=args.max_queries, batch_size=args.batch_size or cfg.data.eval_batch_size,
        progress=not args.quiet, keep_images=keep, gallery=gallery,
    )
    print(f"{spec.to_string()}")
    for key, value in result.items():
        print(f"  {key} = {value:.4f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dict(result), indent=2, sort_keys=True))
    if args.save_images is not None:
        if not keep:
            print("--save-images: clustering attacks keep no images; nothing saved")
        else:
            outcome = result.outcomes[0]
            clean = torch.stack([test[int(i)][0] for i in outcome.indices])
            for f in save_images(clean, outcome.adv_images, outcome.indices, Path(args.save_images)):
                print(f"wrote {f}")
    return 0
