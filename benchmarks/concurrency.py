"""Concurrent clients: aggregate tokens/s and latency against `mlx-engine serve` and mlx-lm's server.

    python -m benchmarks.concurrency [--clients 1 4 8 16] [--tokens 64] [--out DIR]

Each server is a fresh subprocess on a free loopback port, serving the embedded default model
(mlx_engine/default_model; mlx-lm's server is given the same folder) or the `--model` given. For each client count N,
N threads each send `--requests` streaming chat requests one after another (greedy, prompts of
the same length, `max_tokens` = `--tokens`); aggregate tokens/s is every completion token the
server reported (`usage` in the stream's last chunk) over the wall time from the first request
sent to the last stream's end. Latency is one request's whole stream; time to first token is
until the first chunk that carries generated text.

Contenders: ours plain, ours with one residual capture per request (the with_activations
route, base64, one layer's residual at every step), and mlx-lm (`python -m mlx_lm.server`); if
mlx-lm's server cannot start or serve the folder, the run records why. Then time to first
token (a one-token request's whole time) for one repeated prompt of about `--ttft-prompt`
tokens against ours with the prompt cache (its default size) and without it
(`--prompt-cache-mb 0`).

results.json and RESULTS-concurrency.md (written from it by concurrency_report.py) go to a new
timestamped folder. A benchmark, not a test: it runs minutes and wants the machine to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import requests

from .concurrency_report import table, write_concurrency_report
from .machine import find_openblas, machine_summary, versions

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "mlx_engine" / "default_model"
CAPTURE_LAYER = 2
WORDS = ("encoder", "value", "return", "self", "json", "list", "index", "parse", "string", "object", "key", "default")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a port chosen here, ready once GET /v1/models answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, timeout: float,
                 env_extra: Optional[dict[str, str]] = None) -> None:
        self.name, self.log, self.url = name, log, f"http://127.0.0.1:{port}"
        # As typed from the repository root: no path of this machine in the results.
        shown = " ".join("python" if c == sys.executable else c.replace(str(REPO) + os.sep, "") for c in cmd)
        self.command = " ".join([*(f"{k}={v}" for k, v in (env_extra or {}).items()), shown])
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), **(env_extra or {}))
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                if requests.get(self.url + "/v1/models", timeout=30).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{name} did not answer /v1/models in {timeout:.0f}s: {self.tail()}")

    def tail(self, n: int = 600) -> str:
        return self.log.read_text(errors="replace")[-n:].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


MODEL = DEFAULT_MODEL  # what every server serves (--model)


def start_ours(log: Path, extra: list[str], timeout: float) -> Server:
    port = _free_port()
    cmd = [sys.executable, "-m", "mlx_engine.server", "--model", str(MODEL), "--port", str(port), "--threads", "64", *extra]
    return Server("mlx-engine serve", cmd, port, log, timeout)


def start_mlx_lm(log: Path, timeout: float) -> Server:
    port = _free_port()
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(MODEL), "--port", str(port)]
    # `import mlx_engine` binds MLX to OpenBLAS in our server; mlx-lm's gets it the way a Linux
    # user would give it, preloaded (else it runs on the wheel's reference BLAS, several times slower).
    openblas = find_openblas()
    return Server("mlx_lm.server", cmd, port, log, timeout, {"LD_PRELOAD": openblas} if openblas else None)


def prompt_text(seed: int, words: int) -> str:
    """`words` words drawn from a fixed list: the same length in tokens, give or take the tokenizer."""
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=words))


def one_request(url: str, route: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one streaming request and time it: first generated text, end of stream, usage."""
    tic = time.perf_counter()
    first: Optional[float] = None
    usage: Optional[dict[str, Any]] = None
    chunks = 0
    with requests.post(url + route, json=body, stream=True, timeout=timeout) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.text[:300]}"}
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"error": json.dumps(event["error"])[:300]}
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                if any(delta.get(k) for k in ("content", "reasoning", "reasoning_content")):
                    chunks += 1
                    first = first if first is not None else time.perf_counter() - tic
    out: dict[str, Any] = {"latency": time.perf_counter() - tic, "ttft": first, "chunks": chunks}
    if usage:
        out["completion_tokens"] = usage.get("completion_tokens")
        out["prompt_tokens"] = usage.get("prompt_tokens")
        out["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return out


def one_token(url: str, prompt: str, timeout: float) -> dict[str, Any]:
    """Time to first token as the whole of a one-token request: prefill plus one token's pass.

    (A streamed first chunk would not do: the default model's first tokens are Harmony
    channel markers, which carry no text.)"""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0.0}
    tic = time.perf_counter()
    r = requests.post(url + "/v1/chat/completions", json=body, timeout=timeout)
    elapsed = time.perf_counter() - tic
    if r.status_code != 200:
        return {"error": f"HTTP {r.status_code}: {r.text[:300]}"}
    usage = r.json().get("usage") or {}
    return {"ttft": elapsed, "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}


def chat_body(prompt: str, tokens: int, capture: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if capture:
        body["activation_hooks"] = [{"layer_name": CAPTURE_LAYER, "component": "residual"}]
        body["activation_format"] = "base64"
    return body


def clients_run(server: Server, n: int, args: argparse.Namespace, capture: bool) -> dict[str, Any]:
    """N clients, each sending `args.requests` requests in turn; all start together."""
    route = "/v1/chat/completions/with_activations" if capture else "/v1/chat/completions"
    results: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    gate = threading.Barrier(n + 1)

    def client(i: int) -> None:
        gate.wait()
        for k in range(args.requests):
            body = chat_body(prompt_text(1000 * i + k, args.prompt_words), args.tokens, capture)
            try:
                results[i].append(one_request(server.url, route, body, args.timeout))
            except requests.RequestException as exc:
                results[i].append({"error": repr(exc)[:300]})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    gate.wait()
    tic = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    runs = [r for rs in results for r in rs]
    ok = [r for r in runs if "error" not in r]
    row: dict[str, Any] = {"clients": n, "requests": len(runs), "failed": len(runs) - len(ok), "wall_s": wall}
    if not ok:
        row["error"] = runs[0]["error"] if runs else "no requests"
        return row
    tokens = [r.get("completion_tokens") if r.get("completion_tokens") is not None else r["chunks"] for r in ok]
    row["tokens_counted_by"] = "usage" if all(r.get("completion_tokens") is not None for r in ok) else "chunks"
    latencies = sorted(r["latency"] for r in ok)
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    row.update(
        completion_tokens=sum(tokens), tokens_per_s=sum(tokens) / wall,
        latency_p50=float(np.percentile(latencies, 50)), latency_p95=float(np.percentile(latencies, 95)),
        ttft_p50=float(np.percentile(ttfts, 50)) if ttfts else None,
        prompt_tokens=sorted({r["prompt_tokens"] for r in ok if r.get("prompt_tokens") is not None}),
    )
    return row


def batching_of(server: Server) -> Optional[dict[str, Any]]:
    try:
        return requests.get(server.url + "/health", timeout=30).json().get("batching")
    except (requests.RequestException, ValueError):
        return None


def concurrency(name: str, start, args: argparse.Namespace, capture: bool, folder: Path) -> dict[str, Any]:
    """One contender over every client count, on one server it starts and stops."""
    try:
        server = start(folder / f"{name}.log")
    except RuntimeError as exc:
        print(f"{name}: {exc}", flush=True)
        return {"contender": name, "error": str(exc)}
    try:
        warm = clients_run(server, 1, argparse.Namespace(**{**vars(args), "requests": 1}), capture)  # loads and compiles
        rows = []
        for n in args.clients:
            row = clients_run(server, n, args, capture)
            rows.append(row)
            shown = row.get("error") or f"{row['tokens_per_s']:.1f} tok/s, p50 {row['latency_p50']:.2f} s, p95 {row['latency_p95']:.2f} s"
            print(f"{name:<24} {n:>3} clients  {shown}", flush=True)
        return {"contender": name, "command": server.command, "warmup_error": warm.get("error"), "rows": rows, "batching": batching_of(server)}
    finally:
        server.stop()


def ttft_repeated(name: str, extra: list[str], args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Time to first token for one long prompt sent `--ttft-repeats` times, one after another."""
    try:
        server = start_ours(folder / f"{name}.log", extra, args.start_timeout)
    except RuntimeError as exc:
        return {"setting": name, "error": str(exc)}
    try:
        prompt = prompt_text(7, args.ttft_words)
        one_token(server.url, prompt_text(3, 8), args.timeout)  # a short warm-up: the first pass compiles
        runs = [one_token(server.url, prompt, args.timeout) for _ in range(args.ttft_repeats)]
        bad = [r for r in runs if "error" in r]
        if bad:
            return {"setting": name, "command": server.command, "error": bad[0]["error"]}
        later = [r["ttft"] for r in runs[1:]]
        out = {"setting": name, "command": server.command, "prompt_tokens": runs[0].get("prompt_tokens"),
               "first_ttft": runs[0]["ttft"], "repeat_ttft_median": statistics.median(later) if later else None,
               "first_cached_tokens": runs[0].get("cached_tokens"), "repeat_cached_tokens": [r.get("cached_tokens") for r in runs[1:]]}
        print(f"ttft {name:<18} first {out['first_ttft']:.3f} s, repeats {later}", flush=True)
        return out
    finally:
        server.stop()


def _words_for(tokens: int) -> int:
    """About `tokens` prompt tokens from the served model's tokenizer (the chat template adds its own)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    per_word = len(tok.encode(prompt_text(0, 200))) / 200
    return max(1, round(tokens / per_word))


def _model_folder(name: str) -> Path:
    if name == "default":
        return DEFAULT_MODEL
    if name == "llama-125m-f32":
        from .checkpoints import ModelSpec, ensure_synth

        return ensure_synth(ModelSpec("llama-125m-f32", "llama-125m", "float32"), REPO / "benchmarks" / ".cache")
    return Path(name).resolve()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.concurrency", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of every request (greedy)")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends in turn")
    p.add_argument("--prompt-tokens", type=int, default=64, help="about how long each client's prompt is")
    p.add_argument("--ttft-prompt", type=int, default=1000, help="about how long the repeated prompt is (0: skip)")
    p.add_argument("--ttft-repeats", type=int, default=4, help="times the long prompt is sent (the first one fills the cache)")
    p.add_argument("--no-mlx-lm", action="store_true", help="skip mlx-lm's server")
    p.add_argument("--out", type=Path, default=Path("benchmarks/.cache/runs"), help="a new timestamped folder is made here")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds a server may take to start")
    p.add_argument("--model", default="default", help="'default' (the embedded model), 'llama-125m-f32' (synthetic, "
                   "written to benchmarks/.cache: weights too large for the CPU's caches), or a model folder")
    args = p.parse_args(argv)
    global MODEL
    MODEL = _model_folder(args.model)
    args.prompt_words = _words_for(args.prompt_tokens)
    args.ttft_words = _words_for(args.ttft_prompt) if args.ttft_prompt else 0

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = os.getloadavg()  # before any server: other work on the machine
    folder = args.out / time.strftime("concurrency-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=False)
    batch = ["--max-batch-size", str(max(max(args.clients), 1))]
    contenders = [
        concurrency("ours", lambda log: start_ours(log, batch, args.start_timeout), args, False, folder),
        concurrency("ours + residual capture", lambda log: start_ours(log, batch, args.start_timeout), args, True, folder),
    ]
    (folder / "partial.json").write_text(json.dumps(contenders, indent=1))
    if not args.no_mlx_lm:
        contenders.append(concurrency("mlx-lm", lambda log: start_mlx_lm(log, args.start_timeout), args, False, folder))
        (folder / "partial.json").write_text(json.dumps(contenders, indent=1))
    ttft = []
    if args.ttft_prompt:
        ttft = [ttft_repeated("prompt cache on", [], args, folder), ttft_repeated("prompt cache off", ["--prompt-cache-mb", "0"], args, folder)]
    results = {
        "command": "python -m benchmarks.concurrency " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "model": str(MODEL.relative_to(REPO)) if MODEL.is_relative_to(REPO) else str(MODEL),
        "settings": {"clients": args.clients, "tokens": args.tokens, "requests_per_client": args.requests,
                     "prompt_tokens_target": args.prompt_tokens, "prompt_words": args.prompt_words,
                     "ttft_prompt_target": args.ttft_prompt, "ttft_repeats": args.ttft_repeats,
                     "capture": f"layers.{CAPTURE_LAYER}.residual, base64, every step", "max_batch_size": int(batch[1])},
        "load_average_start": load_start, "load_average_end": os.getloadavg(), "machine": machine_summary(), "versions": versions(),
        "contenders": contenders, "ttft": ttft,
    }
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    write_concurrency_report(results, folder / "RESULTS-concurrency.md")
    print(table(contenders))
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
