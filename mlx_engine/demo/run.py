"""The demo's flow: serve the model, ask through the openai client and the bridge, write the folder."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, TypeVar

from tqdm import tqdm

from .layout import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_OUT_ROOT,
    DEFAULT_PROMPT,
    ATTENTION_PNG,
    ATTENTION_SVG,
    CAPTURE_FILE,
    NEUROSCOPE_FILE,
    RESIDUAL_PNG,
    RESIDUAL_SVG,
    SMALLTALK_DIALECT,
    SMALLTALK_FILE,
    SUMMARY_FILE,
    INDEX_FILE,
    choose_hooks,
    new_run_folder,
)
from .index_page import write_index
from .pictures import (
    attention_grid,
    residual_norms,
    write_attention_pictures,
    write_residual_pictures,
)
from .summary import DemoRun, write_summary

T = TypeVar("T")



# ----------------------------------------------------------------------------- server


def _with_elapsed(desc: str, fn: Callable[[], T]) -> T:
    """Run `fn` while a progress line counts the seconds: loading reports no finer progress."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool, tqdm(
        desc=desc, bar_format="{desc}: {elapsed}", file=sys.stderr
    ) as bar:
        future = pool.submit(fn)
        while True:
            try:
                return future.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                bar.refresh()


@contextmanager
def serving(target: str, model_id: str) -> Iterator[str]:
    """Load `target` into a real mlx-engine server on a free 127.0.0.1 port; yield its base URL.

    The model is loaded through the server's own state (on its engine thread, which
    must own the MLX arrays) under `model_id`, so the requests can name it as the user
    did. Leaving the block stops the HTTP server and then the engine thread.
    """
    from ..server import ServerConfig, create_app, make_server
    from ..server.state import EXTENSION_KEY

    config = ServerConfig(model=None, host="127.0.0.1", port=0, threads=4)
    app = create_app(config)
    state = app.extensions[EXTENSION_KEY]
    # Binding before loading gives waitress's worker threads time to become idle, so the
    # first request is not reported as queued.
    server = make_server(app, config)
    thread = threading.Thread(target=server.run, name="mlx-engine-demo-server", daemon=True)
    try:
        _with_elapsed(f"loading model {model_id}", lambda: state.load(target, model_id))
        thread.start()
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        # Let the worker threads finish their last responses first: a task that ends after
        # close() finds waitress's wake-up pipe closed and prints a traceback.
        server.task_dispatcher.shutdown(cancel_pending=False, timeout=10)
        server.close()
        if thread.is_alive():
            thread.join(timeout=10)
        state.engine.stop()


# ----------------------------------------------------------------------------- requests


def chat_through_openai(base_url: str, model_id: str, prompt: str, hooks: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """A whole chat completion with activations, asked with the official `openai` client.

    The activation fields ride in `extra_body` on the way in and come back as extra
    fields of the SDK's response object, which `model_dump` keeps.
    """
    from openai import OpenAI

    # The demo server has no API key; the SDK insists on one, and the server ignores it.
    # Closing the client closes its kept-alive connection, which lets the server shut down at once.
    with OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600.0) as client:
        completion = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            extra_body={"activation_hooks": hooks, "activation_format": "base64"},
        )
    return completion.model_dump()


def stream_with_progress(base_url: str, model_id: str, prompt: str, hooks: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """The same chat streamed from /v1/chat/completions/with_activations, one progress tick per token."""
    from ..integrations.neuroscope.client import NeuroScopeClient

    client = NeuroScopeClient(base_url)
    client.model = model_id
    stream = client.generate_with_activations(
        prompt, hooks, stream=True, activation_format="base64", max_tokens=max_tokens, temperature=0.0
    )
    with tqdm(total=max_tokens, desc="streaming tokens", unit="tok", file=sys.stderr) as bar:
        for chunk in stream:  # type: ignore[union-attr]
            if chunk.token_id is not None:
                bar.update(1)
                bar.set_postfix_str(repr(chunk.token_text), refresh=False)
    return stream.response()  # type: ignore[union-attr]


def download_capture(base_url: str, capture_id: str, dest: Path) -> int:
    """Fetch the whole capture as safetensors from the server's capture store; bytes written."""
    url = f"{base_url}/v1/activations/captures/{urllib.parse.quote(capture_id, safe='')}"
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read()
    dest.write_bytes(data)
    return len(data)



# ----------------------------------------------------------------------------- the demo


def _check_inputs(prompt: str, max_tokens: int) -> None:
    if not prompt.strip():
        raise ValueError("--prompt must not be empty.")
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}.")
    from ..server.config import ServerConfig

    limit = ServerConfig().max_tokens_limit
    if max_tokens > limit:
        raise ValueError(f"--max-tokens must be at most {limit}, the server's limit; got {max_tokens}.")


def demo(
    model: str = "default",
    out_root: str | Path = DEFAULT_OUT_ROOT,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    prompt: str = DEFAULT_PROMPT,
) -> DemoRun:
    """Run the demo and answer everything it found; `run_demo` answers just the folder."""
    from ..integrations.neuroscope.client import NeuroScopeClient
    from ..integrations.neuroscope.format import convert_activations_for_neuroscope
    from ..integrations.neuroscope.smalltalk import generate_smalltalk_client
    from ..loading import resolve_model_path

    _check_inputs(prompt, max_tokens)
    started = datetime.now()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tqdm.write(f"mlx-engine demo: model {model!r}", file=sys.stderr)
    # Resolving first turns a bad name into a clear error before anything starts, and shows
    # the Hub's own download progress when the model is not cached yet.
    path, model_id = resolve_model_path(model)
    timings["resolve model"] = time.perf_counter() - t0

    with serving(str(path), model_id) as base_url:
        timings["load model"] = time.perf_counter() - t0 - timings["resolve model"]
        tqdm.write(f"serving {model_id} at {base_url}", file=sys.stderr)
        hook_points = NeuroScopeClient(base_url).hook_points(model_id)
        hooks = choose_hooks(hook_points)
        request = hooks.requests()

        t = time.perf_counter()
        tqdm.write("chat completion through the openai client ...", file=sys.stderr)
        openai_body = chat_through_openai(base_url, model_id, prompt, request, max_tokens)
        timings["openai client request"] = time.perf_counter() - t

        t = time.perf_counter()
        streamed = stream_with_progress(base_url, model_id, prompt, request, max_tokens)
        timings["streamed request"] = time.perf_counter() - t

        capture_id = streamed.get("capture_id")
        if not capture_id:
            raise RuntimeError("The server named no capture_id for the streamed request; the capture was not stored.")
        folder = new_run_folder(Path(out_root), started)
        download_capture(base_url, capture_id, folder / CAPTURE_FILE)

    t = time.perf_counter()
    neuroscope = convert_activations_for_neuroscope(streamed)
    (folder / NEUROSCOPE_FILE).write_text(json.dumps(neuroscope, ensure_ascii=False), encoding="utf-8")
    source = generate_smalltalk_client(SMALLTALK_DIALECT, base_url)
    (folder / SMALLTALK_FILE).write_text(source, encoding="utf-8")

    norms = residual_norms(neuroscope, hooks.residual)
    tokens = list(neuroscope["prompt_tokens"]) + list(neuroscope["generated_tokens"])
    n_prompt = len(neuroscope["prompt_tokens"])
    scale = write_residual_pictures(norms, tokens, n_prompt, model_id, folder / RESIDUAL_PNG, folder / RESIDUAL_SVG)
    pattern_shape = None
    sinks = False
    if hooks.pattern is not None:
        layer = hook_points["layers"][hooks.pattern_layer]
        grid = attention_grid(neuroscope["activations"][hooks.pattern], layer.get("window"))
        sinks = write_attention_pictures(
            grid, tokens, n_prompt, hooks.pattern_layer, hooks.pattern_layer_type, folder / ATTENTION_PNG, folder / ATTENTION_SVG
        )
        pattern_shape = grid.shape
    timings["write files"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    run = DemoRun(
        folder=folder,
        model_id=model_id,
        source=model,
        base_url=base_url,
        prompt=prompt,
        max_tokens=max_tokens,
        hooks=hooks,
        hook_points=hook_points,
        streamed=streamed,
        openai_body=openai_body,
        neuroscope=neuroscope,
        smalltalk_chars=len(source),
        residual_scale=scale,
        norms=norms,
        pattern_shape=pattern_shape,
        pattern_sinks=sinks,
        timings=timings,
    )
    write_index(
        folder,
        model=model_id,
        viewer_url=run.viewer_url,
        prompt=prompt,
        text=run.text,
        reasoning=run.reasoning,
        tokens=tokens,
        n_prompt=n_prompt,
        norms=norms,
        pattern=None if hooks.pattern is None else (hooks.pattern_layer, hooks.pattern_layer_type, sinks),
    )
    write_summary(run)
    return run


# ----------------------------------------------------------------------------- command line


def run_command(args: argparse.Namespace) -> int:
    """`mlx-engine demo`: run the flow and print what it wrote (the last line is the folder)."""
    run = demo(model=args.model, out_root=args.out_root, max_tokens=args.max_tokens, prompt=args.prompt)
    print(f"model:     {run.model_id}")
    print(f"prompt:    {run.prompt!r}")
    if run.reasoning:
        print(f"reasoning: {run.reasoning!r}")
    print(f"generated: {run.text!r}")
    print(f"hooks:     {', '.join(run.hooks.all_ids)}")
    for p in sorted(run.folder.iterdir()):
        print(f"  {p.name:<26} {p.stat().st_size:>10} bytes")
    print(f"viewer:    {run.viewer_url} while the demo ran; `mlx-engine serve` and http://127.0.0.1:8080/ui/ explore live")
    print(f"finished in {run.timings['total']:.1f} s; open {SUMMARY_FILE} (or {INDEX_FILE} in a browser) first. Output folder:")
    print(run.folder)
    return 0
