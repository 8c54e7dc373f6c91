"""The benchmark driver: models, contenders in alternation, server, wire formats, roofline.

Every contender runs in its own worker process (see worker.py) that loads the model
once; the driver then alternates them trial by trial (A B C ... then ... C B A, so a
slow drift of the shared machine falls on every contender alike), after one warm-up
trial each, and reports medians. Results go to results.json and RESULTS.md in --out.
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import checkpoints, machine
from .checkpoints import ModelSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
GPT_OSS_20B_PROMPT, GPT_OSS_20B_TOKENS = 4, 4
BASE_CONTENDERS = ("ours", "mlx_lm", "ours_residual", "ours_all10", "transformers")


@dataclass
class Settings:
    quick: bool
    out: Path
    work: Path
    rounds: int
    prompt_tokens: int
    decode_tokens: int
    wire_steps: int
    with_20b: bool
    profile: bool
    openblas: Optional[str]
    command: str
    models: tuple[ModelSpec, ...]
    keep_work: bool
    prompt_override: bool = False
    decode_override: bool = False


@dataclass
class Worker:
    """A running contender process and its trials."""

    label: str
    contender: str
    proc: subprocess.Popen
    info: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def send(self, cmd: dict[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return read_reply(self.proc, timeout)


def read_reply(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with status {proc.wait()}")
        if line.startswith("@@ "):
            return json.loads(line[3:])
    raise TimeoutError("worker did not answer in time")


def start_worker(label: str, contender: str, model: Path, log_dir: Path, openblas: Optional[str]) -> Worker:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if openblas:
        env["LD_PRELOAD"] = openblas
    else:
        # mlx_engine loads the system OpenBLAS by itself; the reference-BLAS rounds must not.
        env["MLX_ENGINE_NO_OPENBLAS"] = "1"
    log = open(log_dir / f"{label}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.worker", "--contender", contender, "--model", str(model)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO_ROOT,
    )
    info = read_reply(proc, 1800)
    return Worker(label, contender, proc, info)


def launch_one_by_one(plan: list, log_dir: Path, failures: dict[str, Any]) -> list[Worker]:
    workers = []
    for label, contender, path, blas in plan:
        try:
            workers.append(start_worker(label, contender, path, log_dir, blas))
        except (RuntimeError, TimeoutError) as exc:
            failures[label] = {"error": f"did not start: {exc} (see logs/{label}.log)"}
    return workers


def launch_together(plan: list, log_dir: Path, failures: dict[str, Any]) -> list[Worker]:
    from concurrent.futures import ThreadPoolExecutor

    def start(item: tuple) -> Optional[Worker]:
        label, contender, path, blas = item
        try:
            return start_worker(label, contender, path, log_dir, blas)
        except (RuntimeError, TimeoutError) as exc:
            failures[label] = {"error": f"did not start: {exc} (see logs/{label}.log)"}
            return None

    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        return [w for w in pool.map(start, plan) if w is not None]


def stop_worker(w: Worker) -> None:
    try:
        if w.proc.poll() is None:
            w.send({"op": "quit"}, timeout=60)
    except (RuntimeError, TimeoutError, BrokenPipeError, OSError):
        pass
    try:
        w.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        w.proc.kill()
        w.proc.wait()


def server_trial(port: int, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """Stream a completion over SSE; time the first and last token events."""
    body = json.dumps({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    })
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"server answered {resp.status}: {resp.read()[:500]!r}")
    stamps: list[float] = []
    completion_tokens = None
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        payload = line[6:]
        if payload == b"[DONE]":
            break
        chunk = json.loads(payload)
        if chunk.get("choices"):
            stamps.append(time.perf_counter())
        if chunk.get("usage"):
            completion_tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    n = completion_tokens if completion_tokens is not None else len(stamps)
    ttft = stamps[0] - t0
    decode = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else 0.0
    return {"ttft": ttft, "prefill_tps": len(prompt) / ttft, "decode_tps": decode, "n": n, "events": len(stamps), "tokens": []}


def run_trial(w: Worker, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    if w.contender == "server":
        return server_trial(w.info["port"], prompt, max_tokens)
    result = w.send({"op": "trial", "prompt": prompt, "max_tokens": max_tokens})
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def random_prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    """Token ids from the BPE's learned range (below any special-token block)."""
    rng = random.Random(seed)
    return [rng.randrange(300, min(vocab, 2000)) for _ in range(n)]


def _available(module: str, names: tuple[str, ...]) -> tuple[bool, str]:
    """Whether another part of the package (written alongside this one) is there yet."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return False, f"{module} is not importable ({exc})"
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        return False, f"{module} has no {', '.join(missing)}"
    return True, ""


def server_available() -> tuple[bool, str]:
    return _available("mlx_engine.server", ("ServerConfig", "create_app", "make_server"))


def encoding_available() -> tuple[bool, str]:
    return _available("mlx_engine.wire.files", ("captures_to_safetensors", "safetensors_to_captures"))


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(key: str) -> dict[str, float]:
        values = [t[key] for t in trials]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return {
        "decode_tps": stats("decode_tps"),
        "prefill_tps": stats("prefill_tps"),
        "ttft_s": stats("ttft"),
        "tokens": trials[0]["n"],
        "rounds": len(trials),
    }


def profile_worker(w: Worker, prompt: list[int], max_tokens: int, out: Path) -> dict[str, Any]:
    """py-spy samples the worker's main thread during one trial, idle time included.

    With --idle a sample lands wherever the Python thread is, also while it waits for
    MLX's compute (in `item()` or `async_eval`), so shares are shares of wall time.
    """
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return {"error": "py-spy is not installed (pip install py-spy)"}
    raw = out / f"profile-{w.label}.txt"
    spy = subprocess.Popen(
        [py_spy, "record", "--pid", str(w.info["pid"]), "--rate", "100", "--idle", "--format", "raw",
         "--output", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.0)
    run_trial(w, prompt, max_tokens)
    spy.send_signal(signal.SIGINT)
    try:
        _, err = spy.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if not raw.exists():
        return {"error": f"py-spy wrote no profile: {err.strip()[-300:]}"}
    return {"file": raw.name, **aggregate_profile(raw)}


def _frame_name(frame: str, keep_line: bool) -> str:
    """'fn (path/to/file.py:12)' -> 'fn (dir/file.py:12)'; without the line, a function's lines pool."""
    fn, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":")
    short = "/".join(Path(path).parts[-2:]) if "mlx_engine" in path or "mlx_lm" in path else Path(path).name
    return f"{fn} ({short}:{line})" if keep_line and line else f"{fn} ({short})"


def aggregate_profile(raw: Path) -> dict[str, Any]:
    """Shares of the trial's samples: self time per source line, inclusive time per function
    of mlx_engine/mlx_lm. Samples outside the trial (the worker waiting for a command) are left out."""
    total = model_code = 0
    leaf: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if " (" in f]
        if not any("mlx_engine" in f or "mlx_lm" in f for f in frames):
            continue
        n = int(count)
        total += n
        leaf_name = _frame_name(frames[-1], keep_line=True)
        leaf[leaf_name] = leaf.get(leaf_name, 0) + n
        if "/models/" in frames[-1] or "mlx/nn/" in frames[-1] or "/hooks/" in frames[-1]:
            model_code += n  # Python building the forward graph (model, layers, hook points)
        for f in {_frame_name(f, keep_line=False) for f in frames}:
            if "mlx_engine/" in f or "mlx_lm/" in f:
                inclusive[f] = inclusive.get(f, 0) + n
    top = lambda d: [(k, v / max(total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:12]]  # noqa: E731
    return {"samples": total, "self": top(leaf), "inclusive": top(inclusive),
            "model_code_share": model_code / max(total, 1)}


def bench_model(spec: ModelSpec, s: Settings, results: dict[str, Any]) -> None:
    log_dir = s.work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"label": spec.label, "synth_command": spec.synth_command(s.work / spec.key)}
    results["models"][spec.key] = entry
    t = time.perf_counter()
    mlx_dir = checkpoints.ensure_synth(spec, s.work)
    entry["synth_s"] = time.perf_counter() - t
    config = json.loads((mlx_dir / "config.json").read_text())
    entry["config"] = {k: config.get(k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size",
                                                  "num_local_experts", "num_experts_per_tok", "num_attention_heads",
                                                  "num_key_value_heads")}
    entry["checkpoint_bytes"] = sum(f.stat().st_size for f in mlx_dir.glob("model*.safetensors"))
    t = time.perf_counter()
    hf_dir = checkpoints.export_for_transformers(mlx_dir, s.work / f"{spec.key}-transformers")
    entry["export_s"] = time.perf_counter() - t

    plan: list[tuple[str, str, Path, Optional[str]]] = [
        (c, c, hf_dir if c == "transformers" else mlx_dir, None) for c in BASE_CONTENDERS
    ]
    if s.openblas and spec.dtype == "float32" and not s.quick:
        plan += [("ours+openblas", "ours", mlx_dir, s.openblas), ("mlx_lm+openblas", "mlx_lm", mlx_dir, s.openblas)]
    ok, why = server_available()
    if ok:
        plan.append(("server", "server", mlx_dir, None))
    else:
        entry["server_pending"] = why

    workers: list[Worker] = []
    entry["contenders"] = {}
    try:
        # Quick mode starts the workers together (load times then overlap); the full run
        # starts them one by one so each load time is its own.
        launch = launch_together if s.quick else launch_one_by_one
        workers = launch(plan, log_dir, entry["contenders"])
        prompt_tokens = spec.prompt_tokens if spec.prompt_tokens and not s.prompt_override else s.prompt_tokens
        decode_tokens = spec.decode_tokens if spec.decode_tokens and not s.decode_override else s.decode_tokens
        entry["trial"] = {"prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens}
        prompt = random_prompt(config["vocab_size"], prompt_tokens)
        for w in workers:  # warm-up: compile, allocate, fill caches
            try:
                run_trial(w, prompt, decode_tokens)
            except (RuntimeError, OSError) as exc:
                w.errors.append(f"warm-up: {exc}")
        order = [w for w in workers if not w.errors]
        for r in range(s.rounds):
            for w in (order if r % 2 == 0 else order[::-1]):
                try:
                    w.trials.append(run_trial(w, prompt, decode_tokens))
                except (RuntimeError, OSError) as exc:
                    w.errors.append(f"round {r}: {exc}")
        if s.profile:
            entry["profiles"] = {
                w.label: profile_worker(w, prompt, decode_tokens, s.work)
                for w in workers if w.label in ("ours", "ours_residual") and not w.errors
            }
        wire_worker = next((w for w in workers if w.label == "ours" and not w.errors), None)
        ok, why = encoding_available()
        if spec.key == s.models[0].key:
            if wire_worker is None or not ok:
                results["wire"] = {"pending": why or "the in-process contender failed"}
            else:
                wire = wire_worker.send({"op": "wire", "prompt": prompt, "steps": s.wire_steps}, timeout=3600)
                results["wire"] = {"model": spec.key, **wire}
        for w in workers:
            record: dict[str, Any] = {"load_s": w.info.get("load_s"), "errors": w.errors}
            for k in ("bytes_per_token", "num_layers", "torch_threads"):
                if k in w.info:
                    record[k] = w.info[k]
            if w.trials:
                record.update(summarize(w.trials))
                record["first_tokens"] = w.trials[0].get("tokens", [])[:16]
                if w.contender == "server":
                    record["events"] = w.trials[0].get("events")
            try:
                record["peak_rss"] = w.send({"op": "stats"}, timeout=60)["peak_rss"]
            except (RuntimeError, TimeoutError, KeyError, OSError):
                pass
            entry["contenders"][w.label] = record
    finally:
        for w in workers:
            stop_worker(w)


def bench_gpt_oss_20b(s: Settings, results: dict[str, Any], spec: ModelSpec = checkpoints.GPT_OSS_20B) -> None:
    """Synthesize the full gpt-oss-20b shape (4-bit) outside the repo, load, decode, delete."""
    root = s.work / "gpt-oss-20b"
    entry: dict[str, Any] = {"label": spec.label, "synth_command": spec.synth_command(root / spec.key)}
    results["gpt_oss_20b"] = entry
    try:
        t = time.perf_counter()
        code = (
            "import sys, json\n"
            "from benchmarks.checkpoints import ensure_synth, ModelSpec\n"
            "from pathlib import Path\n"
            "ensure_synth(ModelSpec(**json.loads(sys.argv[2])), Path(sys.argv[1]))\n"
            "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "print('@@ ' + json.dumps({'peak_rss': int(hwm.split()[1]) * 1024}))\n"
        )
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        done = subprocess.run(
            [sys.executable, "-c", code, str(root), json.dumps(spec.__dict__)],
            capture_output=True, text=True, env=env, cwd=REPO_ROOT,
        )
        if done.returncode != 0:
            entry["error"] = f"synth failed: {done.stderr[-800:]}"
            return
        entry["synth_s"] = time.perf_counter() - t
        entry["synth_peak_rss"] = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("@@ "))[3:])["peak_rss"]
        mlx_dir = root / spec.key
        entry["checkpoint_bytes"] = sum(f.stat().st_size for f in mlx_dir.glob("model*.safetensors"))
        (s.work / "logs").mkdir(parents=True, exist_ok=True)
        w = start_worker("gpt-oss-20b", "ours", mlx_dir, s.work / "logs", None)
        try:
            entry["load_s"] = w.info["load_s"]
            entry["rss_after_load"] = w.info.get("rss")
            entry["bytes_per_token"] = w.info.get("bytes_per_token")
            prompt = random_prompt(201088, GPT_OSS_20B_PROMPT)
            entry["prompt_tokens"], entry["decode_tokens"] = GPT_OSS_20B_PROMPT, GPT_OSS_20B_TOKENS
            run_trial(w, prompt[:1], 2)  # warm-up
            trials = [run_trial(w, prompt, GPT_OSS_20B_TOKENS) for _ in range(2)]
            entry["trials"] = trials
            entry["decode_tps"] = statistics.median(t["decode_tps"] for t in trials)
            entry["prefill_tps"] = statistics.median(t["prefill_tps"] for t in trials)
            entry["peak_rss"] = w.send({"op": "stats"})["peak_rss"]
        finally:
            stop_worker(w)
    except (RuntimeError, TimeoutError, OSError, StopIteration) as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
        entry["deleted"] = not root.exists()


def run(s: Settings) -> dict[str, Any]:
    from .report import write_report

    s.out.mkdir(parents=True, exist_ok=True)
    s.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": s.command,
        "quick": s.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {"rounds": s.rounds, "prompt_tokens": s.prompt_tokens, "decode_tokens": s.decode_tokens,
                     "wire_steps": s.wire_steps, "openblas": s.openblas},
        "machine": machine.machine_summary(),
        "versions": machine.versions(),
        "models": {},
    }
    results["bandwidth"] = machine.memory_bandwidth(0.25 if s.quick else 1.0)
    results["kernels"] = {"reference BLAS": machine.kernel_rates(None, s.quick)}
    if s.openblas:
        results["kernels"]["OpenBLAS"] = machine.kernel_rates(s.openblas, s.quick)
    for spec in s.models:
        bench_model(spec, s, results)
    if s.with_20b:
        bench_gpt_oss_20b(s, results)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["load_average_end"] = os.getloadavg()
    (s.out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, s.out / "RESULTS.md")
    if not s.keep_work and s.quick:
        shutil.rmtree(s.work, ignore_errors=True)
    return results


def settings_from_args(args: argparse.Namespace, argv: list[str]) -> Settings:
    quick = args.quick
    if args.out is not None:
        out = Path(args.out)
    elif quick:
        out = Path(tempfile.mkdtemp(prefix="mlx-engine-bench-quick-"))
    else:
        out = Path(__file__).resolve().parent
    work = Path(args.work) if args.work else (out / "work" if quick else Path(tempfile.gettempdir()) / "mlx-engine-bench")
    models = checkpoints.QUICK_MODELS if quick else checkpoints.FULL_MODELS
    if args.models:
        known = {m.key: m for m in checkpoints.QUICK_MODELS + checkpoints.FULL_MODELS}
        models = tuple(known[k] for k in args.models.split(","))
    openblas = None if args.no_openblas else machine.find_openblas()
    return Settings(
        quick=quick,
        out=out,
        work=work,
        rounds=args.rounds or (2 if quick else 3),
        prompt_tokens=args.prompt_tokens or (16 if quick else 64),
        decode_tokens=args.decode_tokens or (6 if quick else 24),
        wire_steps=args.wire_steps or (8 if quick else 100),
        with_20b=(not quick) and not args.skip_20b,
        profile=args.profile if args.profile is not None else not quick,
        openblas=openblas,
        command=" ".join(["python -m benchmarks", *map(shlex.quote, argv)]),
        models=models,
        keep_work=args.keep_work,
        prompt_override=args.prompt_tokens is not None,
        decode_override=args.decode_tokens is not None,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny model, few tokens: checks the harness end to end")
    p.add_argument("--out", default=None, help="where RESULTS.md and results.json go (quick: a new temp dir)")
    p.add_argument("--work", default=None, help="where synthetic checkpoints go (default: outside the repo)")
    p.add_argument("--models", default=None, help="comma-separated model keys (default: all for the mode)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--decode-tokens", type=int, default=None)
    p.add_argument("--wire-steps", type=int, default=None)
    p.add_argument("--skip-20b", action="store_true", help="leave out the full gpt-oss-20b shape")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None, help="py-spy the decode loop")
    p.add_argument("--no-openblas", action="store_true", help="do not run the OpenBLAS-preloaded contenders")
    p.add_argument("--keep-work", action="store_true", help="keep the quick mode's checkpoints")
    p.add_argument("--render", default=None, metavar="RESULTS_JSON",
                   help="only rewrite RESULTS.md beside a results.json from an earlier run")


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.render:
        from .report import write_report

        source = Path(args.render)
        write_report(json.loads(source.read_text()), source.parent / "RESULTS.md")
        print(f"Wrote {source.parent / 'RESULTS.md'} from {source}")
        return 0
    s = settings_from_args(args, argv)
    run(s)
    print(f"Wrote {s.out / 'RESULTS.md'} and {s.out / 'results.json'}")
    return 0
