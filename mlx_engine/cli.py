"""`mlx-engine` command line: generate, convert, serve, smalltalk, demo, ..."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional, Sequence


def _cmd_generate(args: argparse.Namespace) -> int:
    from . import chat_tokens, create_generator, load_model, tokenize

    kit = load_model(args.model)
    if args.chat:
        prompt = chat_tokens(kit, [{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenize(kit, args.prompt)
    last = None
    for result in create_generator(kit, prompt, max_tokens=args.max_tokens, temp=args.temp, seed=args.seed):
        sys.stdout.write(result.text)
        sys.stdout.flush()
        last = result
    sys.stdout.write("\n")
    if last is not None:
        print(
            f"[{last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} tok/s, "
            f"{last.generation_tokens} generated at {last.generation_tps:.1f} tok/s, "
            f"finish: {last.finish_reason}, peak memory {last.peak_memory_gb:.2f} GB]",
            file=sys.stderr,
        )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import quantize_checkpoint

    out = quantize_checkpoint(args.model, args.out, bits=args.bits, group_size=args.group_size)
    print(f"Wrote {args.bits}-bit (group size {args.group_size}) checkpoint to {out}")
    return 0


def _cmd_hook_points(args: argparse.Namespace) -> int:
    from . import ActivationHookManager, load_model

    kit = load_model(args.model)
    print(json.dumps(ActivationHookManager(kit).hook_points(), indent=2))
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream text from a model")
    p.add_argument("--model", default="default", help="local folder, Hugging Face repo id, or 'default'")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_cmd_generate)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="quantize a checkpoint to the MLX layout")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--group-size", type=int, choices=(32, 64), default=64)
    p.set_defaults(func=_cmd_convert)


def _add_hook_points(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hook-points", help="list a model's hook points as JSON")
    p.add_argument("--model", default="default")
    p.set_defaults(func=_cmd_hook_points)


def _package_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands whose modules live elsewhere in the package; imported here so a broken
    module fails loudly instead of its command silently vanishing."""
    from .api_server.cli import add_serve_command
    from .demo import add_demo_command
    from .integrations.neuroscope.cli import add_smalltalk_command
    from .synth import add_synth_command

    adders = [add_serve_command, add_demo_command, add_smalltalk_command, add_synth_command]
    try:
        # The benchmarks live beside the package in a source checkout; an installed wheel may lack them.
        from benchmarks import add_bench_command

        adders.append(add_bench_command)
    except ImportError:
        pass
    return adders


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_generate, _add_convert, _add_hook_points, *_package_commands()):
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .model_kit import ModelLoadError

    try:
        return int(args.func(args) or 0)
    except (ModelLoadError, ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
