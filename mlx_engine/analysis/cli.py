"""`mlx-engine analyze circuits|weights`: the command's arguments; the analyses are imported when it runs.

This module imports only argparse at module level, so building the parser (`--help`)
loads neither numpy, MLX nor matplotlib.
"""

from __future__ import annotations

import argparse

CIRCUITS = """Logit lens, direct logit attribution, attention-head scores and (with --corrupted or
--noise-positions) activation patching of one prompt. Writes a new timestamped folder under
--out with figures (PNG, SVG, and their numbers as JSON and CSV), report.md, report.html and
manifest.json."""

WEIGHTS = """Per-matrix weight statistics (distribution, outliers, sparsity, singular values, effective and
stable rank; quantized matrices dequantized), per-layer tables, and with --checkpoints a comparison
of the model and the checkpoints in order with change points. Writes a new timestamped folder under --out."""


def _token(value: str) -> object:
    """A token as given: "#123" is the id 123, anything else a token string."""
    return int(value[1:]) if value.startswith("#") and value[1:].isdigit() else value


def _run_circuits(args: argparse.Namespace) -> int:
    from ..loading import load_model
    from .runs import circuits_analysis, write_circuits

    kit = load_model(args.model)
    results = circuits_analysis(
        kit, args.prompt, corrupted=args.corrupted, target=args.target, foil=args.foil, position=args.position,
        noise_positions=args.noise_positions, metric=args.metric, top_k=args.top_k, repeat_length=args.repeat_length,
        seed=args.seed, progress=not args.quiet,
    )
    arguments = {k: v for k, v in vars(args).items() if k not in ("func",)}
    folder = write_circuits(kit, results, args.out, arguments)
    print(folder)
    return 0


def _run_weights(args: argparse.Namespace) -> int:
    from ..loading import load_model
    from .runs import weight_analysis, write_weights

    kit = load_model(args.model)
    results = weight_analysis(kit, checkpoints=args.checkpoints or (), include=args.include, progress=not args.quiet)
    arguments = {k: v for k, v in vars(args).items() if k not in ("func",)}
    folder = write_weights(kit, results, args.out, arguments)
    print(folder)
    return 0


def add_analyze_command(sub: argparse._SubParsersAction) -> None:
    """`mlx-engine analyze circuits --model M --prompt TEXT [...] --out DIR` and `analyze weights --model M --out DIR`."""
    p = sub.add_parser("analyze", help="interpretability analyses of a model (circuits, weights), written to a new folder")
    kinds = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    c = kinds.add_parser("circuits", help="logit lens, DLA, head scores, activation patching", description=CIRCUITS, formatter_class=fmt)
    c.add_argument("--model", default="default", help="local folder, Hugging Face repo id, or 'default'")
    c.add_argument("--prompt", required=True, help="the clean prompt (raw text)")
    c.add_argument("--corrupted", default=None, help="a corrupted prompt of the same token length, for activation patching")
    c.add_argument("--noise-positions", type=int, nargs="+", default=None, help="corrupt these positions with embedding noise instead")
    c.add_argument("--target", type=_token, default=None, help="target token (vocabulary entry, one-token text, or #id); default: top-1")
    c.add_argument("--foil", type=_token, default=None, help="foil token; default: the best other token")
    c.add_argument("--position", type=int, default=-1, help="position whose prediction is attributed (-1 = last)")
    c.add_argument("--metric", choices=("logit_diff", "prob"), default="logit_diff", help="patching metric")
    c.add_argument("--top-k", type=int, default=5, help="tokens per layer and position in the logit lens")
    c.add_argument("--repeat-length", type=int, default=20, help="length n of the random sequence repeated for induction scores")
    c.add_argument("--seed", type=int, default=0, help="seed of the random sequence and of noise corruption")
    c.add_argument("--out", required=True, help="folder that receives one new timestamped folder per run")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=_run_circuits)

    w = kinds.add_parser("weights", help="weight statistics, spectra, ranks, checkpoint comparison", description=WEIGHTS, formatter_class=fmt)
    w.add_argument("--model", default="default", help="local folder, Hugging Face repo id, or 'default'")
    w.add_argument("--checkpoints", nargs="+", default=None, help="later checkpoints to compare with --model, in order")
    w.add_argument("--include", default=None, help="only matrices whose name matches this regular expression")
    w.add_argument("--out", required=True, help="folder that receives one new timestamped folder per run")
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    w.set_defaults(func=_run_weights)
    from .neurons.cli import add_neuron_commands  # `analyze report` and `analyze neurons` (argparse only)

    add_neuron_commands(kinds)
