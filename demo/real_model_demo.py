"""`mlx-engine demo` on a real gpt-oss-20b from the Hugging Face Hub, when it can be had.

    python demo/real_model_demo.py [--model REPO_OR_FOLDER] [any other `mlx-engine demo` option]

The model is `mlx-community/gpt-oss-20b-MXFP4-Q4` (MXFP4 experts, 4-bit elsewhere; about
12 GB) unless `--model` or the MLX_ENGINE_DEMO_MODEL environment variable names another
repo id or a local folder. It is fetched first, with the Hub's own progress bars (a
cached copy is used as is). If that fails (no network, offline mode, an unknown repo, a
full disk) the reason is printed together with a line saying the demo falls back to the
embedded default model, and the demo runs with that instead. Either way the last line
printed is the demo's output folder.

It is meant for an Apple-silicon Mac with 24 GB of memory or more; elsewhere MLX runs
the 20B model on the CPU, which works but is slow.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from typing import Optional

DEFAULT_REAL_MODEL = "mlx-community/gpt-oss-20b-MXFP4-Q4"
MODEL_ENV = "MLX_ENGINE_DEMO_MODEL"
# gpt-oss-20b reasons before it answers, so it gets more tokens than the demo's default.
REAL_MODEL_MAX_TOKENS = "48"


def fetch(model: str) -> Optional[str]:
    """Download (or find in the cache) `model`; None when it is there, else why it is not."""
    from mlx_engine.loading import ModelLoadError, resolve_model_path

    try:
        path, _ = resolve_model_path(model)
    except ModelLoadError as exc:
        return str(exc)
    print(f"model files: {path}", flush=True)
    return None


def demo_command(model: str, rest: list[str]) -> list[str]:
    """`mlx-engine demo --model MODEL ...`, through the console script when it is on PATH."""
    exe = shutil.which("mlx-engine")
    head = [exe] if exe else [sys.executable, "-m", "mlx_engine.cli"]
    if "--max-tokens" not in rest and model != "default":
        rest = ["--max-tokens", REAL_MODEL_MAX_TOKENS, *rest]
    return [*head, "demo", "--model", model, *rest]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV) or DEFAULT_REAL_MODEL,
        help=f"Hugging Face repo id or local folder (default: ${MODEL_ENV}, else {DEFAULT_REAL_MODEL})",
    )
    args, rest = parser.parse_known_args(argv)

    if platform.system() != "Darwin" or platform.machine() != "arm64":
        print(f"note: this is {platform.system()} {platform.machine()}, not an Apple-silicon Mac; a 20B model runs slowly here.")
    print(f"fetching {args.model} ...", flush=True)
    reason = fetch(args.model)
    model = args.model
    if reason is not None:
        print(f"could not get {args.model}: {reason}")
        print("FALLING BACK to the embedded default model (4 layers, 4-bit gpt-oss): running the demo with --model default.")
        model = "default"
    command = demo_command(model, rest)
    print("running: " + " ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
