"""`mlx-engine serve`: the command line for the HTTP server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import ServerConfig

# --rank-timeout: far beyond one forward pass or prefill chunk of a split model, short of forever.
RANK_TIMEOUT_S = 60.0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    parser.add_argument("--model", default="default", help="model to load at start: a folder, a Hugging Face repo id, or 'default' (the embedded model; the default)")
    parser.add_argument("--host", default=defaults.host, help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=defaults.port, help="port (0 picks a free one)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* routes")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN", help="allow browser calls from ORIGIN (repeatable)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME", help="also accept this Host header: NAME or NAME:PORT (repeatable; the bound address and loopback names are always accepted)")
    parser.add_argument("--model-root", action="append", default=[], type=Path, metavar="DIR", help="folder whose model folders POST /v1/models/load may load (repeatable)")
    parser.add_argument("--no-hub", action="store_true", help="refuse Hugging Face repo ids in POST /v1/models/load")
    parser.add_argument("--capture-budget-mb", type=float, default=defaults.capture_budget_mb, help="largest estimated capture per request; 0 for no limit")
    parser.add_argument("--max-tokens-limit", type=int, default=defaults.max_tokens_limit, help="largest max_tokens a request may ask for")
    parser.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens, help="max_tokens when a request gives none (fewer if the model's context has less room)")
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens, help="longest prompt a request may send, in tokens; 0: only the model's context bounds it")
    parser.add_argument("--capture-store-items", type=int, default=defaults.capture_store_items, help="captures kept for download")
    parser.add_argument("--capture-store-mb", type=float, default=defaults.capture_store_mb, help="bytes of captures kept for download")
    parser.add_argument("--store-root", type=Path, default=None, metavar="DIR", help="folder of activation stores: POST /v1/extract writes a new store here and GET /v1/stores reads the stores under it (both off without it)")
    parser.add_argument("--sae-root", action="append", default=[], type=Path, metavar="DIR", help="folder whose SAE folders POST /v1/models/{id}/saes may attach (repeatable; model roots count too)")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="WSGI worker threads")
    parser.add_argument("--log-request-bodies", action="store_true", help="log request bodies (off by default: prompts are private)")
    parser.add_argument("--shutdown-grace", type=float, default=defaults.shutdown_grace_s, metavar="SECONDS", help="on SIGINT/SIGTERM, how long open streams get to receive their final events")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="generations decoded together in one forward (continuous batching); 1: one at a time")
    parser.add_argument("--prompt-cache-mb", type=float, default=defaults.prompt_cache_mb, help="bytes of recent prompts' KV caches kept for prompts that share a prefix; 0: off")
    parser.add_argument(
        "--parallel", choices=("tensor", "pipeline"), default=None,
        help="under mlx.launch (or MLX_RANK/MLX_HOSTFILE): split --model over the job's ranks (heads and units, or "
        "blocks); rank 0 serves HTTP, the others follow it (no port). Generations run one at a time (continuous "
        "batching off); loading other models, analyses, extraction and SAEs are refused. A job of one process "
        "serves as without it",
    )
    parser.add_argument(
        "--rank-timeout", type=float, default=RANK_TIMEOUT_S, metavar="SECONDS",
        help="with --parallel: a generation whose forward passes or messages to the other ranks make no progress "
        "this long has lost a rank (on rank 0 it fails with 503 rank_lost and the server exits 1; a rank > 0 exits 1)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        cors_origins=tuple(args.cors_origin),
        allowed_hosts=tuple(args.allowed_host),
        model_roots=tuple(args.model_root),
        allow_hub_models=not args.no_hub,
        capture_budget_mb=args.capture_budget_mb,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        capture_store_items=args.capture_store_items,
        capture_store_mb=args.capture_store_mb,
        store_root=args.store_root,
        sae_roots=tuple(args.sae_root),
        threads=args.threads,
        log_request_bodies=args.log_request_bodies,
        shutdown_grace_s=args.shutdown_grace,
        max_batch_size=args.max_batch_size,
        prompt_cache_mb=args.prompt_cache_mb,
        parallel=args.parallel,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; exit 0 after a clean shutdown.

    If the engine thread is still inside a job when the shutdown ends (a model load
    cannot be interrupted), the process ends at once: letting the interpreter finalize
    under a thread inside MLX is what aborts.
    """
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    if config.parallel is not None:
        return _serve_parallel(config, args.rank_timeout)
    return run_config(config)


def _serve_parallel(config: ServerConfig, rank_timeout_s: float) -> int:
    """One rank of `serve --parallel`: rank 0 serves (server/parallel.py), the others follow it.

    Rank 0 ends the process at once (after flushing) unless the job shut down cleanly: a
    lost peer leaves the job's collectives in a state the interpreter's exit should not touch.
    """
    from dataclasses import replace

    from ..distributed.launch import join_job

    if rank_timeout_s <= 0:
        raise ValueError(f"--rank-timeout must be a positive number of seconds, got {rank_timeout_s}")

    group = join_job()
    if group.size() == 1:
        logging.getLogger("mlx_engine.server").info("--parallel %s outside a multi-process job: serving the whole model", config.parallel)
        return run_config(replace(config, parallel=None))
    if group.rank() > 0:
        from ..distributed.serve import follower_main

        return follower_main(config.model or "default", config.parallel or "tensor", rank_timeout_s)
    from ..distributed.serve import RankLostError
    from .app import create_app
    from .parallel import finish, lead
    from .state import EXTENSION_KEY
    from .wsgi import serve

    config = replace(config, max_batch_size=1, prompt_cache_mb=0.0)  # lockstep: one generation at a time
    app = create_app(config)
    try:
        lead(app, group, rank_timeout_s)
    except RankLostError as exc:  # a rank failed to load its part (its own log says why)
        print(f"error: {exc}", file=sys.stderr)
        _exit_now(1)
    engine_idle = serve(config, app)
    code = finish(app.extensions[EXTENSION_KEY], engine_idle, _exit_now)
    if code != 0 or not engine_idle:
        _exit_now(code)
    return code


def run_config(config: ServerConfig) -> int:
    """Serve `config` until SIGINT or SIGTERM (the ordinary server); 0 after a clean shutdown."""
    from .wsgi import serve

    if not serve(config):
        _exit_now(0)
    return 0


def _exit_now(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API with activation capture",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_serve_arguments(parser)
    parser.set_defaults(func=run_serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_engine.server", description="Serve a model over HTTP.")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
