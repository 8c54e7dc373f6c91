"""Train the small gpt-oss model that ships inside mlx-engine as its default model.

The engine needs a model it can load with no download: the demo, the tutorials and the
server's first run all use it, and researchers poke at its activations. A randomly
initialised model would do for plumbing, but its activations mean nothing, so this trains a
real (if tiny) one: the gpt-oss architecture (top-k routed experts, attention sinks,
alternating sliding-window and full attention, YaRN RoPE with ``truncate: false``), so every
code path a real gpt-oss checkpoint takes through the engine is exercised, trained with
transformers + PyTorch on two CPU cores in about a quarter of an hour.

The text is the Python standard library's own source (PSF licence), read from the running
interpreter's stdlib directory, so nothing is downloaded. A slice of it is also rendered as
Harmony chat conversations (docstring -> function, function -> docstring), so the model has
seen its chat template and its special tokens and answers a chat request in the right shape.

Outputs (``--out``, default ``build/default-model-float``, which is git-ignored):
the float32 checkpoint in transformers' layout (safetensors), the tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``) and
``training_report.json``. ``--convert`` then writes the 4-bit MLX conversion that is committed
at ``mlx_engine/default_model/`` (at most 20 MB) with ``mlx_engine.tools.convert``.

Usage (from the repository root)::

    python -m training.default_model                    # train, 15 minutes
    python -m training.default_model --convert          # train, then convert
    python -m training.default_model --convert-only     # convert an existing --out
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .package import PACKAGED_DIR, REPO_ROOT, convert_to_package

DEFAULT_OUT = REPO_ROOT / "build" / "default-model-float"
PROG = "python -m training.default_model"


def build_parser() -> argparse.ArgumentParser:
    """Every option with its default, shown by --help (the defaults are the packaged model's recipe)."""
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="float checkpoint folder (keep it outside mlx_engine/)")
    p.add_argument("--time-budget-min", type=float, default=15.0, help="wall-clock minutes for the training loop")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps and schedule by steps (0: by time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the most used)")
    p.add_argument(
        "--no-adaptive-threads",
        dest="adaptive_threads",
        action="store_false",
        help="always use --threads instead of dropping to one thread while that is faster",
    )
    p.add_argument("--stdlib-dir", default=None, help="stdlib folder (default: this interpreter's)")
    p.add_argument("--val-fraction", type=float, default=0.03, help="fraction of files held out")
    p.add_argument("--chat-fraction", type=float, default=0.1, help="share of training text rendered as Harmony chats")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=256, help="each expert's intermediate size")
    p.add_argument("--sliding-window", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--router-aux-coef", type=float, default=0.05, help="load-balancing loss weight (keeps every expert in use)")
    p.add_argument("--experts-implementation", default="grouped_mm", choices=["eager", "grouped_mm"])
    p.add_argument("--eval-every-s", type=float, default=120.0)
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows scored at each periodic evaluation")
    p.add_argument("--log-every-s", type=float, default=30.0)
    p.add_argument("--sample-tokens", type=int, default=96)
    p.add_argument("--convert", action="store_true", help="after training, write the 4-bit MLX package")
    p.add_argument("--convert-only", action="store_true", help="only convert the checkpoint already in --out")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=32)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the options that would otherwise fail deep inside a run: the float
    checkpoint must stay out of the package, and the head/expert counts must fit together."""
    p = build_parser()
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    if out == PACKAGED_DIR.parent or PACKAGED_DIR.parent in out.parents:
        p.error("--out must not be inside mlx_engine/: only the 4-bit conversion is packaged")
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    if args.top_k > args.experts:
        p.error("--top-k cannot exceed --experts")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Train unless --convert-only, then convert if asked; returns the process exit code."""
    args = parse_args(argv)
    if not args.convert_only:
        # Imported only when training: torch, transformers and the data step are not needed
        # to convert an existing checkpoint or to print --help.
        from .train import train

        train(args)
    if args.convert or args.convert_only:
        return convert_to_package(Path(args.out).resolve(), PACKAGED_DIR, args.bits, args.group_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
