"""`mlx-engine` command line: generate, serve, demo, hook-points, convert, synth, smalltalk, bench.

Every command's parser is built from modules that import nothing heavy, and each
command imports what it needs when it runs, so `mlx-engine --help` and `--version`
answer at once. A mistyped command or flag gets a did-you-mean.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence

from . import __version__


class FriendlyParser(argparse.ArgumentParser):
    """An ArgumentParser that suggests the closest command or flag when one is mistyped."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def, override]
        self._seen = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def _known_words(self) -> list[str]:
        """This parser's flags and commands, and the flags of the command that was given."""
        words = [s for action in self._actions for s in action.option_strings]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                words.extend(action.choices)
                for name, sub in action.choices.items():
                    if name in getattr(self, "_seen", []):
                        words.extend(s for a in sub._actions for s in a.option_strings)
        return words

    def error(self, message: str) -> NoReturn:
        wrong = re.findall(r"invalid choice: '([^']+)'", message)
        if not wrong:
            known = set(self._known_words())
            wrong = [a for a in getattr(self, "_seen", []) if a.startswith("-") and a.split("=")[0] not in known]
        hints = []
        for word in wrong:
            close = difflib.get_close_matches(word.split("=")[0], self._known_words(), n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean {close[0]!r} (not {word!r})?")
        if hints:
            message = f"{message}; {' '.join(hints)}"
        super().error(message)


def _cmd_generate(args: argparse.Namespace) -> int:
    if not args.parallel:
        return _generate(args)
    from .distributed.launch import rank_0_speaks

    with rank_0_speaks():  # one rank of an mlx.launch job: every rank generates in lockstep, rank 0 prints
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    from .generation.api import create_generator
    from .loading import chat_tokens, load_model, tokenize

    kit = load_model(args.model, cpu_dequantize=args.cpu_dequantize, parallel=args.parallel)
    if kit.dequantized:
        print(f"[{kit.dequantized}]", file=sys.stderr)
    if args.chat:
        prompt = chat_tokens(kit, [{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenize(kit, args.prompt)
    # A Harmony chat (gpt-oss) answers in channels, parsed on token ids: `final` is the answer,
    # `analysis` the reasoning; the <|channel|> markers themselves are never shown.
    harmony = None
    if args.chat and kit.is_harmony:
        from .generation.harmony import HarmonyStreamParser, HarmonyTokens

        harmony = HarmonyStreamParser(kit.tokenizer.decode, HarmonyTokens.from_vocab(kit.tokenizer.get_vocab()))
    last = None
    section = None  # which channel's text was written last, when reasoning is shown too
    hidden_reasoning = 0
    for result in create_generator(kit, prompt, max_tokens=args.max_tokens, temp=args.temp, seed=args.seed):
        if harmony is None:
            sys.stdout.write(result.text)
        else:
            delta = harmony.push(result.token)
            if result.finish_reason is not None:
                delta = delta + harmony.finish()
            for name, text in (("reasoning (analysis channel)", delta.reasoning), ("answer (final channel)", delta.content)):
                if not text:
                    continue
                if name.startswith("reasoning") and not args.show_reasoning:
                    hidden_reasoning += 1
                    continue
                if args.show_reasoning and section != name:
                    sys.stdout.write(("" if section is None else "\n") + f"── {name} ──\n")
                    section = name
                sys.stdout.write(text)
        sys.stdout.flush()
        last = result
    sys.stdout.write("\n")
    if hidden_reasoning:
        print(f"[{hidden_reasoning} reasoning tokens not shown: --show-reasoning prints the analysis channel]", file=sys.stderr)
    if last is not None:
        print(
            f"[{last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} tok/s, "
            f"{last.generation_tokens} generated at {last.generation_tps:.1f} tok/s, "
            f"finish: {last.finish_reason}, peak memory {last.peak_memory_gb:.2f} GB]",
            file=sys.stderr,
        )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import warnings

    from .tools.convert import RequantizationWarning, quantize_checkpoint

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RequantizationWarning)
        out = quantize_checkpoint(args.model, args.out, bits=args.bits, group_size=args.group_size, requantize=args.requantize)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(f"Wrote {args.bits}-bit (group size {args.group_size}) checkpoint to {out}")
    return 0


def _cmd_hook_points(args: argparse.Namespace) -> int:
    from .hooks.listing import describe_hook_points
    from .loading import load_model

    print(json.dumps(describe_hook_points(load_model(args.model)), indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """The benchmarks live beside the package in a source checkout (they are not installed)."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "benchmarks" / "harness.py").exists():
        print("error: `mlx-engine bench` runs the benchmarks of a source checkout (git clone the repository); "
              "this installation has none.", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    return subprocess.call([sys.executable, "-m", "benchmarks", *args.bench_args], cwd=repo, env=env)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream text from a model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default", help="local folder, Hugging Face repo id, or 'default'")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (Harmony models: print the final channel)")
    p.add_argument("--show-reasoning", action="store_true", help="with --chat on a Harmony model (gpt-oss), print the analysis channel too")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--cpu-dequantize", action="store_true",
        help="on MLX's CPU backend, run a 4/8-bit model as float32 (faster there; 4 bytes per weight)",
    )
    p.add_argument(
        "--parallel", choices=("tensor", "pipeline"), default=None,
        help="under mlx.launch: split the model over the job's ranks (heads and units, or blocks); rank 0 prints",
    )
    p.set_defaults(func=_cmd_generate)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="quantize a checkpoint to the MLX layout", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--group-size", type=int, choices=(32, 64), default=64)
    p.add_argument(
        "--requantize", action="store_true",
        help="convert an already-quantized model anyway: dequantize, then quantize (the rounding errors compound)",
    )
    p.set_defaults(func=_cmd_convert)


def _add_hook_points(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hook-points", help="list a model's hook points as JSON", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default")
    p.set_defaults(func=_cmd_hook_points)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="run the benchmark harness of a source checkout (options as `python -m benchmarks --help`)", add_help=False
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)


def _package_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands defined beside the code they run; their modules import nothing heavy."""
    from .analysis.cli import add_analyze_command
    from .demo.cli import add_demo_command
    from .integrations.neuroscope.cli import add_smalltalk_command
    from .server.cli import add_serve_command
    from .tools.synth.cli import add_synth_command
    from .store.cli import add_extract_command
    from .verify.cli import add_verify_command
    from .sae.cli import add_sae_command

    return [add_serve_command, add_demo_command, add_smalltalk_command, add_synth_command, add_extract_command, add_analyze_command, add_verify_command, add_sae_command]


def build_parser() -> argparse.ArgumentParser:
    parser = FriendlyParser(prog="mlx-engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"mlx-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_generate, _add_convert, _add_hook_points, *_package_commands(), _add_bench):
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .loading import ModelLoadError

    try:
        return int(args.func(args) or 0)
    except (ModelLoadError, ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
