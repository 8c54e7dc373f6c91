"""`mlx-engine verify --model M [--prompt TEXT] [--tokens N]`: the command's arguments.

The parser imports nothing heavy; MLX, torch and transformers are imported when the
command runs. Exit status: 0 when every tensor is within tolerance and the greedy tokens
agree, 1 when not (the report names the offending tensors), 2 when it cannot run (torch or
transformers missing: the message says how to install them; a model that does not load).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import DEFAULT_PROMPT, DEFAULT_TOKENS


def _run(args: argparse.Namespace) -> int:
    from . import MissingVerifyDependencies, require_reference, verify

    try:
        require_reference()
    except MissingVerifyDependencies as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ..loading import load_model

    report = verify(load_model(args.model), prompt=args.prompt, tokens=args.tokens, atol=args.atol, rtol=args.rtol)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    if not report.passed:
        print(f"error: {report.verdict()}", file=sys.stderr)
        return 1
    return 0


def add_verify_command(sub: argparse._SubParsersAction) -> None:
    """`mlx-engine verify`: compare a model with transformers, every component at every layer."""
    p = sub.add_parser(
        "verify",
        help="prove a model equal to transformers (float32, eager) on this machine, every component at every layer",
        description="Run the model with every component it offers hooked, over a prompt and N greedy decode steps, "
        "and transformers' forward on the same checkpoint; print the largest difference per component and layer, "
        'the greedy-token agreement and a verdict. Needs torch and transformers: pip install "mlx-engine[verify]".',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="default", help="local folder, Hugging Face repo id, or 'default'")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text run through both models")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="greedy decode steps after the prompt")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: by the model's dtype)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: by the model's dtype)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run)
