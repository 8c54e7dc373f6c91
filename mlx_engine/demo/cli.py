"""`mlx-engine demo`: the command's arguments (the flow itself is imported when it runs)."""

from __future__ import annotations

import argparse

from .layout import DEFAULT_MAX_TOKENS, DEFAULT_OUT_ROOT, DEFAULT_PROMPT

DESCRIPTION = """Serve a model on a free loopback port, ask it one question through the official OpenAI
client and again as a stream through the NeuroScope bridge, and write a new folder with the
capture (safetensors and NeuroScope JSON), the Smalltalk client, two pictures (PNG and SVG), a static
page of the views (index.html) and a summary."""


def _run(args: argparse.Namespace) -> int:
    from .run import run_command

    return run_command(args)


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    """`mlx-engine demo [--model M] [--out-root DIR] [--prompt TEXT] [--max-tokens N]`."""
    p = sub.add_parser(
        "demo",
        help="serve a model, capture activations through the OpenAI and NeuroScope clients, and write a folder of results",
        description=DESCRIPTION,
    )
    p.add_argument("--model", default="default", help="local folder, Hugging Face repo id, or 'default' (the embedded model)")
    p.add_argument("--out-root", default=DEFAULT_OUT_ROOT, help="folder that receives one new timestamped folder per run")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens to generate")
    p.set_defaults(func=_run)
