"""`mlx-engine sae train|pages`: train an SAE on an activation store, write feature pages (parser only:
this module imports nothing heavy; each command imports what it runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_sae_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sae", help="sparse autoencoders: train on an activation store, feature pages",
                       description="Train SAEs and transcoders in MLX on an activation store (`mlx-engine extract`), "
                       "saved in SAELens's format; write feature pages in Neuronpedia's fields.")
    cmds = p.add_subparsers(dest="sae_command", required=True, metavar="SAE_COMMAND")
    _add_train(cmds)
    _add_pages(cmds)


def _add_train(cmds: argparse._SubParsersAction) -> None:
    t = cmds.add_parser("train", help="train an SAE (or a transcoder) on one hook of a store",
                        description="Re-run the same command to resume after an interruption (from out/checkpoint.safetensors).",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--store", required=True, help="the activation store folder")
    t.add_argument("--hook", required=True, help="the store's hook to read (e.g. layers.3.residual)")
    t.add_argument("--target-hook", default=None, help="train a transcoder predicting this hook from --hook")
    t.add_argument("--d-sae", type=int, required=True, help="number of features")
    t.add_argument("--arch", choices=("relu", "topk", "batchtopk", "jumprelu"), default="topk")
    t.add_argument("--k", type=int, default=None, help="topk/batchtopk: active features per token (default 32)")
    t.add_argument("--l1", type=float, default=None, help="relu: L1 coefficient (default 5); jumprelu: L0 coefficient (default 1e-3)")
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--tokens", type=int, default=None, help="training tokens (default: one pass over the training rows)")
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--b-dec-init", choices=("geometric_median", "mean", "zeros"), default="geometric_median")
    t.add_argument("--no-normalize", action="store_true", help="train on raw activations (no fixed mean squared norm)")
    t.add_argument("--decoder", choices=("auto", "unit", "folded"), default="auto",
                   help="unit-norm decoder rows, or norms folded into the L1 (auto: folded for relu)")
    t.add_argument("--resample-every", type=int, default=None, help="relu: resample dead features every N steps (first half)")
    t.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    t.add_argument("--log-every", type=int, default=50, help="steps between logged metrics")
    t.add_argument("--shuffle-block", type=int, default=65536, help="rows per shuffle block")
    t.add_argument("--eval-tokens", type=int, default=8192, help="held-out rows (whole documents at the store's end)")
    t.add_argument("--model", default=None, help="the model for the downstream CE (default: the store's)")
    t.add_argument("--no-eval-ce", action="store_true", help="skip the downstream CE (no model is loaded)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--out", required=True, help="the SAE folder (cfg.json + sae_weights.safetensors, training.json)")
    t.set_defaults(func=_cmd_train)


def _add_pages(cmds: argparse._SubParsersAction) -> None:
    g = cmds.add_parser("pages", help="feature pages (top examples, histogram, logit effects) as JSON",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--sae", required=True, help="an SAE folder or Hub id (SAELens format or Gemma Scope params.npz)")
    g.add_argument("--store", required=True)
    g.add_argument("--model", default=None, help="the model (default: the store's)")
    g.add_argument("--hook", default=None, help="the store's hook (default: the one the SAE reads)")
    g.add_argument("--features", type=int, nargs="*", default=None, help="feature indices (default: all)")
    g.add_argument("--top-k", type=int, default=10)
    g.add_argument("--context", type=int, default=8)
    g.add_argument("--out", required=True, help="the JSON file to write")
    g.set_defaults(func=_cmd_pages)


def _errors() -> tuple[type[BaseException], ...]:
    from ..hooks.names import HookSpecError
    from ..loading import ModelLoadError
    from ..store.errors import StoreError
    from .model import SAEError

    return SAEError, StoreError, HookSpecError, ModelLoadError


def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer import train

    options = {
        "architecture": args.arch, "lr": args.lr, "tokens": args.tokens, "batch_size": args.batch_size, "seed": args.seed,
        "b_dec_init": args.b_dec_init, "normalize": not args.no_normalize, "decoder": args.decoder,
        "checkpoint_every": args.checkpoint_every, "log_every": args.log_every, "shuffle_block": args.shuffle_block,
        "eval_tokens": args.eval_tokens,
    }
    if args.resample_every is not None:
        options["resample_every"] = args.resample_every
    if args.k is not None:
        options["k"] = args.k
    if args.l1 is not None:
        options["l1"] = args.l1
    try:
        result = train(args.store, args.hook, args.d_sae, args.out, target_hook=args.target_hook, model=args.model,
                       eval_ce=not args.no_eval_ce, progress=not args.no_progress, **options)
    except _errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: re-run the same command to resume from {args.out}'s last checkpoint.", file=sys.stderr)
        return 130
    shown = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    print(f"{result.sae} -> {result.path}\n{json.dumps(shown, indent=2)}")
    return 0


def _cmd_pages(args: argparse.Namespace) -> int:
    from ..loading import load_model
    from ..store.reader import ActivationStore
    from .formats import load_sae
    from .pages import feature_pages

    try:
        store = ActivationStore.open(args.store)
        model = args.model or store.manifest["model"]["path"]
        kit = load_model(model if Path(model).exists() or args.model else store.manifest["model"]["id"])
        pages = feature_pages(load_sae(args.sae), store, kit, features=args.features, hook=args.hook, top_k=args.top_k, context=args.context)
    except _errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(pages) + "\n", encoding="utf-8")
    print(f"{len(pages['features'])} feature pages -> {args.out}")
    return 0
