"""`mlx-engine extract`: write an activation store from a corpus (parser only: imports nothing heavy)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _hook(text: str) -> Any:
    """A hook as the engine takes it: a name, or a JSON object (e.g. with `indices`)."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON hook spec ({exc.msg}): {text}") from None
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text}")
    return value


def add_extract_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="run a model over a corpus and store every row of the given hooks, with online statistics",
        description="Write an activation store (sharded safetensors, manifest, documents, statistics) to --out. "
        "Re-run the same command to resume after an interruption. Under mlx.launch (or MLX_RANK and MLX_HOSTFILE) "
        "every rank extracts its share of the corpus and rank 0 writes the one manifest; with --parallel the model is "
        "split over the ranks instead, every rank runs every batch and rank 0 writes the store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="default", help="local folder, Hugging Face repo id, or 'default'")
    p.add_argument("--data", required=True, help="a .txt file (one document per line), a folder of text files, .jsonl, "
                   ".parquet, or a `datasets` save_to_disk folder")
    p.add_argument("--hooks", required=True, nargs="+", type=_hook, metavar="HOOK",
                   help="hook names (layers.3.residual, blocks.3.mlp.hook_post, ...) or JSON specs "
                   "('{\"layer_name\": 3, \"component\": \"mlp_post\", \"indices\": [0, 7]}')")
    p.add_argument("--out", required=True, help="the store folder: new, empty, or a store of the same command to resume")
    p.add_argument("--context-size", type=int, default=1024, help="tokens per window; longer documents are split")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (right-padded)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (default: the whole corpus)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="stored activation dtype")
    p.add_argument("--text-field", default="text", help="the text column of .jsonl, .parquet and datasets input")
    p.add_argument("--packed", action="store_true", help="pack documents into full windows without document masks "
                   "(SAELens style); rows then differ from per-document runs")
    p.add_argument("--shard-tokens", type=int, default=None, help="rows per shard (default: about 256 MiB per shard)")
    p.add_argument("--top-k", type=int, default=20, help="top examples kept per neuron")
    p.add_argument("--active-threshold", type=float, default=0.0, help="a neuron is active where its value exceeds this")
    p.add_argument("--rank-timeout", type=_seconds, default=600.0, metavar="SECONDS",
                   help="in a data-parallel job: how long a rank waits for the others at one step before it concludes "
                   "that one has stopped and exits 1 (its committed shards kept). A legitimate wait is another rank "
                   "finishing its last chunks, so keep it well above the time of a shard")
    p.add_argument("--parallel", choices=("tensor", "pipeline"), default=None,
                   help="in a job of several ranks: split the model over them (heads and MLP units, or blocks) instead "
                   "of giving every rank the whole model and a share of the corpus; rank 0 writes the store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)


def _cmd_extract(args: argparse.Namespace) -> int:
    from ..distributed import ShardingError
    from ..hooks.names import HookSpecError
    from ..loading import ModelLoadError
    from .errors import StoreError, StoreWriteError
    from .extract import extract
    from .ranks import RankLostError

    try:
        store = extract(
            args.model, args.data, args.hooks, args.out, context_size=args.context_size, batch_size=args.batch_size,
            max_tokens=args.max_tokens, dtype=args.dtype, text_field=args.text_field, packed=args.packed,
            shard_tokens=args.shard_tokens, top_k=args.top_k, active_threshold=args.active_threshold,
            progress=not args.no_progress, rank_timeout_s=args.rank_timeout, parallel=args.parallel,
        )
    except (StoreError, HookSpecError, ModelLoadError, ShardingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (StoreWriteError, RankLostError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {args.out} holds the shards committed so far; re-run the same command to resume.", file=sys.stderr)
        return 130
    if store is None and args.parallel:  # a rank other than 0 of a model-parallel job, on another machine than rank 0
        print(f"done: this rank ran its part of the model; rank 0 wrote the store to {args.out} on its machine.")
        return 0
    if store is None:  # a rank of a data-parallel job whose folder does not hold every rank's shards
        print(f"done: this rank's shards are in {args.out}; the store is complete once every rank's shards/ files "
              "are in rank 0's --out folder.")
        return 0
    print(f"{store.num_tokens} tokens of {len(store.hooks)} hook(s) in {store.path} ({len(store.manifest['shards'])} shards)")
    return 0
