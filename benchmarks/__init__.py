"""mlx-engine benchmarks: one entry point (`python -m benchmarks`, `mlx-engine bench`).

See harness.py for the method and RESULTS.md for the latest full run.
"""

from __future__ import annotations

import argparse


def _cmd_bench(args: argparse.Namespace) -> int:
    from .harness import main

    return main(args.bench_argv)


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    """`mlx-engine bench [--quick] [--out DIR] ...`: the same options as `python -m benchmarks`."""
    from .harness import add_arguments

    p = subparsers.add_parser("bench", help="benchmark decode/prefill, capture, server and wire formats")
    add_arguments(p)
    p.set_defaults(func=lambda args: _cmd_bench(_with_argv(args)))


def _with_argv(args: argparse.Namespace) -> argparse.Namespace:
    """Rebuild the option list so the run records the command exactly as `python -m benchmarks` takes it."""
    argv: list[str] = []
    for flag, value in (("--out", args.out), ("--work", args.work), ("--models", args.models),
                        ("--rounds", args.rounds), ("--prompt-tokens", args.prompt_tokens),
                        ("--decode-tokens", args.decode_tokens), ("--wire-steps", args.wire_steps),
                        ("--render", args.render)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, on in (("--quick", args.quick), ("--skip-20b", args.skip_20b), ("--no-openblas", args.no_openblas),
                     ("--keep-work", args.keep_work)):
        if on:
            argv.append(flag)
    if args.profile is not None:
        argv.append("--profile" if args.profile else "--no-profile")
    args.bench_argv = argv
    return args
