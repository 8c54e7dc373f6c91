"""`mlx-engine smalltalk`: write the NeuroScope Smalltalk client for a dialect."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .smalltalk import DEFAULT_BASE_URL, DIALECTS, generate_smalltalk_client


def add_smalltalk_command(sub: argparse._SubParsersAction) -> None:
    """`mlx-engine smalltalk --dialect D [--base-url URL] [--out FILE]`."""
    p = sub.add_parser("smalltalk", help="write the NeuroScope Smalltalk client for a dialect")
    _add_arguments(p)
    p.set_defaults(func=_run)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dialect", choices=DIALECTS, required=True)
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"the server the class-side default talks to ({DEFAULT_BASE_URL})")
    p.add_argument("--out", type=Path, help="file to write (default: standard output)")


def _run(args: argparse.Namespace) -> int:
    source = generate_smalltalk_client(args.dialect, args.base_url)
    if args.out is None:
        sys.stdout.write(source)
    else:
        args.out.write_text(source, encoding="utf-8")
        print(f"wrote {args.out} ({args.dialect}, {len(source)} characters)", file=sys.stderr)
    return 0


def main_smalltalk(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry point with the same arguments as `mlx-engine smalltalk`."""
    parser = argparse.ArgumentParser(prog="mlx-engine smalltalk", description=generate_smalltalk_client.__doc__)
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main_smalltalk())
