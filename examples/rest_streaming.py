"""Stream a chat with activations over plain HTTP and print each token with its residual norms.

    mlx-engine serve --model default                # in another terminal, or pass --serve
    python examples/rest_streaming.py [--base-url http://127.0.0.1:8080] [--prompt TEXT] [--max-tokens N]

Nothing here needs mlx-engine on the client side: the request is plain JSON sent with
`requests`, the Server-Sent Events are split by hand, and base64 captures become numpy
arrays with `np.frombuffer`, so the same steps work from any language. Each event
carries the captures of the forward pass that chose its token, so the first event
holds the whole prompt (step 0) and every later one a single new position.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional

import numpy as np
import requests

DEFAULT_BASE_URL = "http://127.0.0.1:8080"


def decode(capture: Mapping[str, Any]) -> np.ndarray:
    """A base64 wire capture as a float32 array of its shape (little-endian bytes on the wire)."""
    raw = base64.b64decode(capture["data"])
    dtype = capture["dtype"]
    if dtype == "bfloat16":  # the 16-bit pattern is the top half of a float32
        values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(np.float32)
    return values.reshape(capture["shape"])


def server_events(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The JSON payloads of an SSE body until `data: [DONE]` (one `data:` line per event here)."""
    data: list[str] = []
    for line in response.iter_lines(decode_unicode=False):
        text = line.decode("utf-8")
        if text == "":
            if data:
                payload, data = "\n".join(data), []
                if payload == "[DONE]":
                    return
                yield json.loads(payload)
        elif text.startswith("data:"):
            data.append(text[5:].lstrip(" "))


def server_answers(base_url: str) -> bool:
    try:
        return requests.get(f"{base_url}/health", timeout=5).ok
    except requests.ConnectionError:
        return False


@contextmanager
def local_server(model: str) -> Iterator[str]:
    """An mlx-engine server for `model` on a free loopback port, for the length of the block."""
    from mlx_engine.server import ServerConfig, create_app, make_server

    config = ServerConfig(model=model, port=0, threads=4)
    server = make_server(create_app(config), config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        thread.join(timeout=10)


def stream(base_url: str, prompt: str, max_tokens: int, model: Optional[str]) -> int:
    models = requests.get(f"{base_url}/v1/models", timeout=30).json()["data"]
    model_id = model or models[0]["id"]
    points = requests.get(f"{base_url}/v1/models/{model_id}/hook_points", timeout=30).json()
    hook_ids = [f"layers.{i}.residual" for i in range(points["num_layers"])]
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": prompt}],
        "activation_hooks": [{"layer_name": i, "component": "residual"} for i in range(points["num_layers"])],
        "activation_format": "base64",
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    with requests.post(f"{base_url}/v1/chat/completions/with_activations", json=body, stream=True, timeout=300) as response:
        if not response.ok:
            print(f"server refused the request: {response.status_code} {response.text}", file=sys.stderr)
            return 1
        print(f"model {model_id}: residual-stream norm of each layer's last row, per step")
        print(f"{'step':>4} {'token':>18}  " + " ".join(f"{'L' + str(i):>8}" for i in range(len(hook_ids))))
        finish = None
        for event in server_events(response):
            if event.get("prompt_tokens_text"):
                print(f"prompt: {len(event['prompt_tokens_text'])} tokens")
            choices = event.get("choices") or [{}]
            finish = choices[0].get("finish_reason") or finish
            activations = event.get("activations")
            if not activations:
                continue
            rows = [decode(activations[h][0]) for h in hook_ids]
            step = activations[hook_ids[0]][0]["step"]
            norms = [float(np.linalg.norm(r[-1])) for r in rows]
            print(f"{step:>4} {event.get('token_text', '')!r:>18}  " + " ".join(f"{n:8.3f}" for n in norms))
        print(f"finish reason: {finish}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"the server's root URL (default {DEFAULT_BASE_URL})")
    parser.add_argument("--serve", action="store_true", help="start a server in this process instead of using --base-url")
    parser.add_argument("--model", default=None, help="model to use (with --serve: to load; default 'default')")
    parser.add_argument("--prompt", default="Write a Python function that reads a file.")
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    if args.serve:
        with local_server(args.model or "default") as url:
            return stream(url, args.prompt, args.max_tokens, args.model)
    base_url = args.base_url.rstrip("/")
    if not server_answers(base_url):
        print(
            f"No mlx-engine server answers at {base_url}. Start one with\n"
            f"    mlx-engine serve --model default --port 8080\n"
            f"or run this example with --serve.",
            file=sys.stderr,
        )
        return 2
    return stream(base_url, args.prompt, args.max_tokens, args.model)


if __name__ == "__main__":
    sys.exit(main())
