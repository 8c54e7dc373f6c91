"""SAE benchmarks: TopK training here against SAELens, and SAE features streamed during decode.

    python -m benchmarks.sae_training [--quick] [--out DIR] [--work DIR]

Training. An activation store is written by `mlx_engine.extract` from the embedded default
model (trained, d_model 256, gpt-oss layout) on the source text of standard-library modules
(100-line documents), at one layer's residual; the store's rows are exported to a numpy file.
Then, each in its own fresh process (so each peak resident set, VmHWM, is its own):
  ours     mlx_engine.sae.train on the store (benchmarks/sae_trainers.py)
  saelens  SAELens's SAETrainer on a TopKTrainingSAE, fed the same batches in the same order
           from the exported rows (benchmarks/sae_trainers.py says exactly which code runs)
with the same d_sae, k, lr, learning-rate schedule (linear warm-up and decay), batch size,
number of tokens, dead-latent window, gradient clipping and seed. Both SAEs are saved in
SAELens's format and `sae_trainers.heldout_metrics` (numpy) measures FVE and L0 of each on the
same held-out rows (the store's last documents, which neither trainer saw).

Decode (benchmarks/sae_decode.py). The llama-125m-shape synthetic checkpoint (float32) with a
TopK SAE of d_sae = 8 x d_model at one layer, its top-k features captured at every step,
against hooks off: median decode tok/s over alternating rounds in one process.

results.json and RESULTS-sae.md (benchmarks/sae_report.py) go to a new timestamped folder under
--out; the committed benchmarks/results-sae.json and RESULTS-sae.md are those of the last full run.
`--quick` runs tiny sizes (its figures check the harness, not speed) and runs the three
measurement processes side by side to finish sooner.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from .checkpoints import QUICK_MODELS, ModelSpec, ensure_synth
from .long_prompts import SPEC as LLAMA_125M
from .machine import machine_summary, versions
from .sae_report import write_sae_report

MARK = "@@ "
CHUNK_LINES = 100
MODULES = ("argparse", "json.decoder", "logging", "pathlib", "typing", "subprocess", "threading", "inspect", "tempfile",
           "dataclasses", "functools", "textwrap", "string", "shlex", "glob", "fnmatch", "contextlib", "abc", "enum",
           "heapq", "bisect", "csv", "configparser", "datetime", "calendar", "random", "statistics", "fractions",
           "decimal", "difflib", "pprint", "copy", "queue", "sched", "selectors", "socketserver", "zipfile", "tarfile",
           "gzip", "shutil", "uuid", "base64", "hashlib", "hmac", "secrets", "ipaddress", "mimetypes", "locale",
           "gettext", "optparse", "getopt", "traceback", "warnings", "weakref", "types", "operator", "collections",
           "numbers", "codecs", "unittest.case", "doctest", "pdb", "cmd", "timeit", "trace", "tokenize", "ast")


@dataclass(frozen=True)
class Settings:
    """One run's sizes: the store, the training run both trainers share, and the decode trial."""

    label: str
    store_tokens: int
    context_size: int
    layer: int
    d_sae: int
    k: int
    lr: float
    batch_size: int
    steps: int
    eval_tokens: int
    seed: int
    decode_model: ModelSpec
    decode_layer: int
    decode_width: int
    decode_prompt_tokens: int
    decode_tokens: int
    decode_rounds: int
    modules: int

    @property
    def hook(self) -> str:
        return f"layers.{self.layer}.residual"

    def schedule(self) -> dict[str, int]:
        """Steps of linear warm-up and of linear decay (our trainer's defaults: 5% and 20%), and the
        dead-latent window (our default cap, a quarter of the run); both trainers are given these."""
        return {"warm_up_steps": self.steps // 20, "decay_steps": self.steps // 5, "dead_steps": max(1, self.steps // 4)}


FULL = Settings("full", store_tokens=32768, context_size=256, layer=2, d_sae=2048, k=32, lr=3e-4, batch_size=2048,
                steps=96, eval_tokens=8192, seed=0, decode_model=LLAMA_125M, decode_layer=6, decode_width=8,
                decode_prompt_tokens=32, decode_tokens=48, decode_rounds=7, modules=len(MODULES))
QUICK = Settings("quick", store_tokens=1024, context_size=128, layer=2, d_sae=512, k=8, lr=3e-4, batch_size=128,
                 steps=6, eval_tokens=256, seed=0, decode_model=QUICK_MODELS[0], decode_layer=1, decode_width=8,
                 decode_prompt_tokens=8, decode_tokens=5, decode_rounds=2, modules=4)


def corpus(count: int, lines: int = CHUNK_LINES) -> list[str]:
    """Documents from the source text of the first `count` MODULES: each cut into `lines`-line chunks, taken
    round-robin (every module's first chunk, then every second chunk, ...), so a capped store still spans
    all of them and its last documents, the held-out rows, are short. Deterministic and offline."""
    chunks = []
    for name in MODULES[:count]:
        text = inspect.getsource(importlib.import_module(name)).splitlines(keepends=True)
        chunks.append(["".join(text[i : i + lines]) for i in range(0, len(text), lines)])
    return [c[i] for i in range(max(map(len, chunks))) for c in chunks if i < len(c)]


def prepare(s: Settings, work: Path) -> dict[str, Any]:
    """The store (written unless complete), its rows as rows.npy, our trainer's batch order and normalisation rows."""
    import numpy as np

    import mlx_engine
    from mlx_engine.sae.config import TrainConfig
    from mlx_engine.sae.data import BatchStream, open_source, sample_rows

    folder = work / f"sae-store-{s.label}"
    started = time.perf_counter()
    kit = mlx_engine.load_model("default")
    store = mlx_engine.extract(kit, corpus(s.modules), [s.hook], folder, context_size=s.context_size,
                               max_tokens=s.store_tokens, progress=False)
    extract_s = time.perf_counter() - started
    defaults = TrainConfig(d_sae=s.d_sae)
    source = open_source(store, s.hook, None, s.eval_tokens)
    stream = BatchStream(source, s.batch_size, s.seed, defaults.shuffle_block, defaults.shuffle_buffer)
    order = np.stack([idx for _, idx in zip(range(s.steps), _epochs(stream))])
    rows = np.asarray(source.views[0][: source.n_rows], np.float32)
    _, first = next(stream.batches(0))
    if not np.array_equal(first[0], rows[order[0]]):
        raise RuntimeError("the exported batch order does not match the trainer's first batch")
    export = work / f"sae-export-{s.label}"
    export.mkdir(parents=True, exist_ok=True)
    np.save(export / "rows.npy", rows)
    np.save(export / "order.npy", order)
    np.save(export / "norm_rows.npy", sample_rows(source, defaults.init_rows, s.seed)[0])
    return {"store": str(folder), "rows": str(export / "rows.npy"), "order": str(export / "order.npy"),
            "norm_rows": str(export / "norm_rows.npy"), "norm_rows_count": min(defaults.init_rows, source.n_train),
            "d_in": int(rows.shape[1]), "n_rows": source.n_rows, "n_train": source.n_train,
            "documents": int(store.manifest["num_documents"]), "extract_or_open_s": extract_s,
            "store_model": store.manifest["model"].get("id")}


def _epochs(stream: Any) -> Any:
    """Our trainer's batch indices, epoch after epoch, as BatchStream.batches draws them from step 0."""
    epoch = 0
    while True:
        yield from stream._epoch_indices(epoch)
        epoch += 1


def _child(module: str, args: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", module, *args]
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    status = "killed by SIGKILL (on Linux usually the OOM killer)" if proc.returncode == -9 else f"exit status {proc.returncode}"
    return {"error": f"{status}; {(proc.stderr or proc.stdout)[-600:]}"}


def _write(path: Path, obj: dict[str, Any]) -> None:
    """Whole or not at all: a trainer process may be waiting for this file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def _spec_paths(s: Settings, work: Path) -> dict[str, tuple[Path, Path]]:
    """Each trainer's (out folder, spec file); stale spec files removed."""
    paths = {name: (work / f"sae-{s.label}-{name}", work / f"sae-{s.label}-{name}.json") for name in ("ours", "saelens")}
    for _, spec in paths.values():
        spec.unlink(missing_ok=True)
    return paths


def _write_specs(s: Settings, data: dict[str, Any], paths: dict[str, tuple[Path, Path]]) -> None:
    """Each trainer's spec: the data, the shared settings and its out folder (emptied first)."""
    import shutil

    settings = {k: v for k, v in asdict(s).items() if k != "decode_model"}
    for out, path in paths.values():
        if out.exists():
            shutil.rmtree(out)
        _write(path, {**data, **s.schedule(), "settings": {**settings, "hook": s.hook}, "out": str(out)})


def _decode_job(s: Settings, work: Path) -> tuple[str, list[str]]:
    path = work / f"sae-{s.label}-decode.json"
    path.write_text(json.dumps({
        "model": str(ensure_synth(s.decode_model, work)), "model_label": s.decode_model.label, "width": s.decode_width,
        "k": s.k, "layer": s.decode_layer, "seed": s.seed, "prompt_tokens": s.decode_prompt_tokens,
        "decode_tokens": s.decode_tokens, "rounds": s.decode_rounds}))
    return "benchmarks.sae_decode", [str(path)]


def run(s: Settings, work: Path, timeout: float) -> dict[str, Any]:
    """Prepare the data, run the three measurement processes, and measure both SAEs on the held-out rows.

    A full run starts each process after the previous one ended. A quick run starts all three at
    once, side by side: the trainers load their libraries, then wait for their spec files."""
    import numpy as np

    from .sae_trainers import heldout_metrics

    decode_job = _decode_job(s, work)
    paths = _spec_paths(s, work)
    jobs = [("benchmarks.sae_trainers", [name, str(paths[name][1])]) for name in ("ours", "saelens")]
    if s.label == "quick":
        with ThreadPoolExecutor(3) as pool:
            started = [pool.submit(_child, *job, timeout) for job in (*jobs, decode_job)]
            try:
                data = prepare(s, work)
            except BaseException as exc:
                for _, path in paths.values():
                    _write(path, {"cancel": f"preparing the data failed: {exc!r}"})
                raise
            _write_specs(s, data, paths)
            ours, theirs, decode = (f.result() for f in started)
    else:
        data = prepare(s, work)
        _write_specs(s, data, paths)
        ours, theirs, decode = (_child(*job, timeout) for job in (*jobs, decode_job))
    held = np.load(data["rows"], mmap_mode="r")[data["n_train"] : data["n_rows"]]
    training: dict[str, Any] = {"ours": ours, "saelens": theirs}
    for name, rec in training.items():
        if "error" not in rec:
            rec["heldout"] = heldout_metrics(paths[name][0], held)
    return {"data": {k: v for k, v in data.items() if k not in ("rows", "order", "norm_rows")},
            "training": training, "decode": decode}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sae_training", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the harness (no speed figures)")
    p.add_argument("--work", type=Path, default=Path("benchmarks/.cache"), help="where the store, exports and checkpoints go")
    p.add_argument("--out", type=Path, default=Path("benchmarks/.cache/runs"), help="a new timestamped folder is made here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one measurement process may take")
    args = p.parse_args(argv)
    s = QUICK if args.quick else FULL
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = os.getloadavg()
    folder = args.out / time.strftime(f"sae-{s.label}-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=False)
    args.work.mkdir(parents=True, exist_ok=True)
    measured = run(s, args.work, args.timeout)
    try:
        sae_lens_version = metadata.version("sae-lens")
    except metadata.PackageNotFoundError:
        sae_lens_version = "not installed"
    results = {
        "command": " ".join(["python -m benchmarks.sae_training", *(sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick, "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_start": load_start, "load_average_end": os.getloadavg(), "machine": machine_summary(),
        "versions": {**versions(), "sae-lens": sae_lens_version},
        "settings": {**{k: v for k, v in asdict(s).items() if k != "decode_model"}, "hook": s.hook,
                     "decode_model": s.decode_model.label, **s.schedule()},
        **measured,
    }
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    write_sae_report(results, folder / "RESULTS-sae.md")
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
