"""`mlx-engine synth`: the command line of synthetic checkpoints.

`mlx-engine --help` builds every subcommand's parser, so this module imports only
what the parser needs (the preset names and dtype tables, plain Python); numpy, MLX
and the tokenizer trainer are imported by the command itself, when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from . import __doc__ as SYNTH_OVERVIEW  # the package docstring is the command's --help text
from .presets import ARCHITECTURES
from .writer import DEFAULT_SHARD_BYTES, FLOAT_DTYPES


def _parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` for `--set`; VALUE is read as JSON when it parses, else kept as text,
    so `--set model_type=llama` needs no quotes."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set wants KEY=VALUE (VALUE as JSON), got {text!r}.")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _cmd_synth(args: argparse.Namespace) -> int:
    """Run `synth` with the parsed arguments and print the report's summary line."""
    from .build import synthesize  # heavy (numpy, MLX): only when the command runs

    report = synthesize(
        args.like,
        args.out,
        bits=args.bits,
        group_size=args.group_size,
        layers=args.layers,
        dtype=args.dtype,
        seed=args.seed,
        overrides=dict(args.set or []),
        shard_bytes=int(args.shard_gb * 2**30),
        force=args.force,
    )
    print(report.summary())
    return 0


def add_synth_command(subparsers: argparse._SubParsersAction) -> None:
    """`mlx-engine synth --like NAME --out DIR [--bits 4 --group-size 32] [--layers N]`."""
    p = subparsers.add_parser(
        "synth",
        help="write a random-weight checkpoint with a named architecture's exact shapes",
        description=SYNTH_OVERVIEW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--like", required=True, choices=sorted(ARCHITECTURES))
    p.add_argument("--out", required=True, help="folder to write (must be new or empty unless --force)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 6, 8), default=None, help="quantize (MLX affine layout)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64)
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--dtype", choices=sorted(FLOAT_DTYPES), default=None, help="float dtype (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 2**30, help="max GiB per shard")
    p.add_argument("--set", type=_parse_override, action="append", metavar="KEY=JSON",
                   help="override a config key, dotted for nested keys (rope_scaling.truncate=true)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=_cmd_synth)


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m mlx_engine.tools.synth.cli ARGS`: the `synth` subcommand on its own,
    without the rest of the `mlx-engine` command line."""
    parser = argparse.ArgumentParser(prog="mlx-engine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_synth_command(sub)
    args = parser.parse_args(["synth", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
