"""RESULTS.md from results.json: every figure comes from the run, with how it was made."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

GIB = 2**30
TARGETS = {
    "hooks_off": 0.97,
    "residual": 0.90,
    "server": 0.95,
    "base64_speedup": 5.0,
    "gpt_oss_20b_gib": 14.0,
}
CONTENDER_TEXT = {
    "ours": "mlx_engine.create_generator (no hooks)",
    "mlx_lm": "mlx_lm.stream_generate",
    "ours_residual": "create_generator_with_activations, residual of every layer",
    "ours_all10": "create_generator_with_activations, all ten components of every layer",
    "transformers": "transformers generate, torch float32, output_hidden_states=True",
    "ours+openblas": "ours, LD_PRELOAD=OpenBLAS",
    "mlx_lm+openblas": "mlx-lm, LD_PRELOAD=OpenBLAS",
    "server": "mlx_engine.server, POST /v1/completions stream=true (SSE over 127.0.0.1)",
}


def _f(x: Optional[float], digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _ratio(a: Optional[dict], b: Optional[dict], key: str = "decode_tps") -> Optional[float]:
    if not a or not b or key not in a or key not in b or not b[key]["median"]:
        return None
    return a[key]["median"] / b[key]["median"]


def _overlap(a: dict, b: dict, key: str = "decode_tps") -> bool:
    return a[key]["min"] <= b[key]["max"] and b[key]["min"] <= a[key]["max"]


def _verdict(value: Optional[float], target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "**missed**"


def target_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, measured, verdict, why/what would close it) for each target and model."""
    rows = []
    for key, m in r["models"].items():
        c = m.get("contenders", {})
        ours, lm, res, srv = c.get("ours"), c.get("mlx_lm"), c.get("ours_residual"), c.get("server")
        ratio = _ratio(ours, lm)
        why = ""
        if ratio is not None and ratio < TARGETS["hooks_off"]:
            if _overlap(ours, lm):
                why = (f"The rounds overlap (ours {_f(ours['decode_tps']['min'])}-{_f(ours['decode_tps']['max'])}, "
                       f"mlx-lm {_f(lm['decode_tps']['min'])}-{_f(lm['decode_tps']['max'])} tok/s): the gap is within "
                       "this machine's run-to-run spread; more rounds on an idle machine would settle it.")
            else:
                why = "The rounds do not overlap: a consistent gap. See the profile section for where our loop spends time."
        rows.append((f"{key}: hooks off >= {TARGETS['hooks_off']}x mlx-lm decode", _f(ratio, 3) + "x" if ratio else "n/a",
                     _verdict(ratio, TARGETS["hooks_off"]), why))
        ratio = _ratio(res, lm)
        why = ""
        if ratio is not None and ratio < TARGETS["residual"]:
            vs_ours = _ratio(res, ours)
            why = (f"Residual capture runs at {_f(vs_ours, 3)}x our own hooks-off speed. Each captured layer adds "
                   "an array to the step's evaluation and a Capture object in Python; the profile section shows the share.")
        rows.append((f"{key}: residual of every layer >= {TARGETS['residual']}x mlx-lm decode",
                     (_f(ratio, 3) + "x" if ratio else "n/a") + (f" ({_f(_ratio(res, ours), 3)}x hooks off)" if ratio else ""),
                     _verdict(ratio, TARGETS["residual"]), why))
        if srv is not None or "server_pending" in m:
            ratio = _ratio(srv, ours)
            why = m.get("server_pending", "")
            if ratio is not None and ratio < TARGETS["server"]:
                if _overlap(srv, ours):
                    why = (f"The rounds overlap (server {_f(srv['decode_tps']['min'])}-{_f(srv['decode_tps']['max'])}, "
                           f"in-process {_f(ours['decode_tps']['min'])}-{_f(ours['decode_tps']['max'])} tok/s): within "
                           "this machine's run-to-run spread, where the HTTP client's process also competes for the two "
                           "cores; more rounds on an idle machine would settle it.")
                else:
                    why = ("The rounds do not overlap: a consistent gap. Each token crosses the engine thread's queue, "
                           "Flask/waitress and an SSE write, and the client parses JSON per event.")
            rows.append((f"{key}: server SSE >= {TARGETS['server']}x in-process decode",
                         _f(ratio, 3) + "x" if ratio else "pending", _verdict(ratio, TARGETS["server"]), why))
    wire = r.get("wire", {})
    for part in ("one_step", "all_steps"):
        if part in wire:
            speed = wire[part]["base64"]["mb_per_s"] / wire[part]["json"]["mb_per_s"]
            why = ""
            if speed < TARGETS["base64_speedup"]:
                why = ("Per-capture fixed costs (metadata, JSON framing, MLX->numpy conversion) dominate such small "
                       "tensors; batching a step's layers into one base64 blob would close it.")
            rows.append((f"wire {part.replace('_', ' ')}: base64 >= {TARGETS['base64_speedup']}x faster than json end to end",
                         f"{_f(speed, 1)}x", _verdict(speed, TARGETS["base64_speedup"]), why))
    if "pending" in wire:
        rows.append(("wire formats: base64 >= 5x faster than json", "pending", "not measured", wire["pending"]))
    g = r.get("gpt_oss_20b")
    if g:
        peak = g.get("peak_rss")
        why = g.get("error", "")
        if peak is not None and peak / GIB > TARGETS["gpt_oss_20b_gib"]:
            why = "The 4-bit weights alone are most of it; group size 64 instead of 32 saves 0.5 bit per weight."
        rows.append((f"gpt-oss-20b shape decodes within {TARGETS['gpt_oss_20b_gib']} GiB resident",
                     f"{_f(peak / GIB)} GiB peak" if peak else "n/a", _verdict(peak / GIB if peak else None,
                     TARGETS["gpt_oss_20b_gib"], higher_is_better=False), why))
    return rows


def macs_per_position(config: dict[str, Any]) -> tuple[int, int]:
    """(multiply-adds of the LM head, of everything else) for one position of a decoder."""
    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    attention = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    if config.get("num_local_experts"):
        k, e = config["num_experts_per_tok"], config["num_local_experts"]
        mlp = h * e + k * 3 * h * config["intermediate_size"]
    else:
        mlp = 3 * h * config["intermediate_size"]
    return config["vocab_size"] * h, config["num_hidden_layers"] * (attention + mlp)


def _prefill_note(key: str, m: dict[str, Any]) -> list[str]:
    """Why prefill ratios are comparable: both loops apply the LM head to the last prompt position only."""
    from mlx_engine.tools import synth

    from .checkpoints import FULL_MODELS, GPT_OSS_20B, QUICK_MODELS

    spec = {x.key: x for x in FULL_MODELS + QUICK_MODELS + (GPT_OSS_20B,)}.get(key)
    if spec is None or "trial" not in m:
        return []
    config = synth.architecture_config(spec.like, spec.layers, spec.overrides)
    head, body = macs_per_position(config)
    p = m["trial"]["prompt_tokens"]
    skipped = (p - 1) * head / (p * (head + body))
    return [
        "",
        f"Prefill arithmetic (from the config, not timed): the LM head is {100 * head / (head + body):.0f}% of a "
        f"position's multiply-adds. Both our loop (native models) and mlx-lm apply it to the last of the {p} prompt "
        f"positions only, which saves {100 * skipped:.0f}% of this prompt's arithmetic over computing every "
        "position's logits; prefill differences come from elsewhere.",
    ]


def _model_section(key: str, m: dict[str, Any], r: dict[str, Any]) -> list[str]:
    c = m.get("contenders", {})
    lm, ours = c.get("mlx_lm"), c.get("ours")
    s = r["settings"]
    lines = [
        f"### {key}: {m['label']}",
        "",
        f"Checkpoint: {m['checkpoint_bytes'] / 2**20:,.1f} MiB, config {m['config']}. "
        f"Made by `{m['synth_command']}` in {_f(m.get('synth_s'), 1)} s (0 s when reused); the transformers "
        f"copy (float32, dequantized) took {_f(m.get('export_s'), 1)} s.",
        "",
        f"Each trial: a {m['trial']['prompt_tokens']}-token prompt, then {m['trial']['decode_tokens']} greedy tokens; prefill tok/s = "
        "prompt tokens / time to first token, decode tok/s = (tokens - 1) / (last token time - first token time). "
        f"Medians of {s['rounds']} alternating rounds after one warm-up each, [min-max] beside them.",
        "",
        "| contender | decode tok/s | x mlx-lm | x ours (hooks off) | prefill tok/s | time to first token (s) | peak RSS (MiB) | load (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rec in c.items():
        if "decode_tps" not in rec:
            errs = rec.get("error") or "; ".join(rec.get("errors", [])) or "no trials"
            lines.append(f"| {label}: {CONTENDER_TEXT.get(label, label)} | failed: {errs} | | | | | | |")
            continue
        d, p, t = rec["decode_tps"], rec["prefill_tps"], rec["ttft_s"]
        lines.append(
            f"| {label}: {CONTENDER_TEXT.get(label, label)} | {_f(d['median'])} [{_f(d['min'])}-{_f(d['max'])}] | "
            f"{_f(_ratio(rec, lm), 3)} | {_f(_ratio(rec, ours), 3)} | {_f(p['median'], 1)} | {_f(t['median'], 3)} | "
            f"{_f(rec.get('peak_rss', 0) / 2**20, 0)} | {_f(rec.get('load_s'), 1)} |"
        )
    if m.get("server_pending"):
        lines.append(f"\nServer: pending ({m['server_pending']}).")
    agree = []
    if ours and lm and ours.get("first_tokens") and lm.get("first_tokens"):
        same = ours["first_tokens"] == lm["first_tokens"]
        agree.append(f"ours and mlx-lm chose {'the same' if same else 'different'} first {len(ours['first_tokens'])} tokens")
    tr = c.get("transformers")
    if ours and tr and tr.get("first_tokens"):
        n = 0
        for a, b in zip(ours["first_tokens"], tr["first_tokens"]):
            if a != b:
                break
            n += 1
        agree.append(f"transformers (float32) agreed with ours on the first {n} of {len(tr['first_tokens'])} tokens")
    if agree:
        lines += ["", "Same model check: " + "; ".join(agree) + "."]
    lines += _prefill_note(key, m)
    bpt = (ours or {}).get("bytes_per_token")
    bw = r["bandwidth"]["gb_per_s"]
    if bpt and ours and "decode_tps" in ours:
        achieved = bpt * ours["decode_tps"]["median"] / 1e9
        lines += ["", f"Roofline: a decode step reads {bpt / 2**20:,.1f} MiB of weights; at {_f(ours['decode_tps']['median'])} "
                  f"tok/s that is {_f(achieved, 3)} GB/s, {_f(100 * achieved / bw, 1)}% of the measured {_f(bw, 1)} GB/s."]
    prof = m.get("profiles")
    if prof:
        lines += ["", "Profile (py-spy --idle on the worker's Python thread during one trial, prefill included; "
                  "shares of the trial's wall-time samples, self time by source line):", ""]
        for label, pr in prof.items():
            if "error" in pr:
                lines.append(f"- {label}: {pr['error']}")
                continue
            self_top = ", ".join(f"{name} {100 * share:.0f}%" for name, share in pr["self"][:6])
            incl = ", ".join(f"{name} {100 * share:.0f}%" for name, share in pr["inclusive"][:8])
            lines.append(f"- {label} ({pr['samples']} samples; raw stacks `{pr['file']}` in the work folder): self time: {self_top}. "
                         f"Inclusive, in mlx_engine/mlx_lm code: {incl}.")
    lines.append("")
    return lines


def _layout_sizes() -> list[str]:
    """Weight bytes of the gpt-oss-20b shape in other 4-bit layouts, from the tensor plan (not written)."""
    from mlx_engine.tools import synth

    config = synth.architecture_config("gpt-oss-20b")
    out = []
    for dtype, group in (("float32", 64), ("bfloat16", 32), ("bfloat16", 64)):
        plans, _ = synth.plan_tensors(config, dtype, 4, group)
        out.append(f"{dtype} scales, group {group}: {sum(p.nbytes for p in plans) / GIB:.2f} GiB")
    return ["- the same shape's weights in other layouts (from the tensor plan, not written): " + "; ".join(out)
            + ". Float32 scales are used here because MLX's CPU kernels are several times faster with them "
            "(kernel table below)."]


def _wire_section(r: dict[str, Any]) -> list[str]:
    w = r.get("wire", {})
    if "pending" in w:
        return ["## Wire formats", "", f"Pending: {w['pending']}.", ""]
    if not w:
        return []
    lines = [
        "## Wire formats",
        "",
        f"Residual stream of all {w['num_layers']} layers of `{w['model']}` ({w['dtype']}). One step = the captures "
        f"handed out with one generated token; the {w['steps']}-token capture = every step together "
        f"({w['rows_per_layer']} rows per layer). End to end = encode every capture and serialise "
        "(`encode_capture` + `json.dumps`, or `captures_to_safetensors`), then parse and turn every tensor into "
        "numpy (`json.loads` + `decode_capture`, or `safetensors_to_captures`). MB/s counts tensor bytes.",
        "",
        "| capture | format | tensor bytes | wire bytes | wire/tensor | encode (ms) | decode (ms) | end to end MB/s | x json |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for part, name in (("one_step", "one step"), ("all_steps", f"{w['steps']} tokens")):
        json_rate = w[part]["json"]["mb_per_s"]
        for fmt, v in w[part].items():
            lines.append(
                f"| {name} | {fmt} | {v['tensor_bytes']:,} | {v['wire_bytes']:,} | {v['wire_bytes'] / v['tensor_bytes']:.2f} | "
                f"{1e3 * v['encode_s']:.2f} | {1e3 * v['decode_s']:.2f} | {_f(v['mb_per_s'], 1)} | {_f(v['mb_per_s'] / json_rate, 1)} |"
            )
    return lines + [""]


def _kernels_section(r: dict[str, Any]) -> list[str]:
    k = r.get("kernels", {})
    if not k:
        return []
    names = [n for n in next(iter(k.values())) if n != "shape"]
    lines = [
        "## CPU kernels (MLX, this machine)",
        "",
        f"{next(iter(k.values()))['shape']}; matvec is decode's shape, matmul prefill's. Each kernel runs for about a "
        "second after one warm-up call.",
        "",
        "| kernel | " + " | ".join(k) + " |",
        "|---|" + "---|" * len(k),
    ]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_f(v.get(n), 2) for v in k.values()) + " |")
    return lines + [""]


def _meaning(r: dict[str, Any]) -> list[str]:
    """Plain reading of this run's figures, each sentence tied to a measured number."""
    lines = ["## What the numbers mean", ""]
    k = r.get("kernels", {}).get("reference BLAS", {})
    kb = r.get("kernels", {}).get("OpenBLAS", {})
    if k:
        q = {d: k[f"matvec 4-bit, {d} scales (GMAC/s)"] for d in ("float32", "bfloat16", "float16")}
        f = {d: k[f"matvec {d} (GMAC/s)"] for d in ("float32", "bfloat16", "float16")}
        lines.append(
            "- On this CPU, MLX's kernels, not memory, set decode speed. A 4-bit matrix-vector product runs at "
            f"{_f(q['float32'])} GMAC/s with float32 scales, {_f(q['bfloat16'])} with bfloat16 and {_f(q['float16'])} "
            f"with float16 ones; unquantized it is {_f(f['float32'])} (float32), {_f(f['bfloat16'])} (bfloat16) and "
            f"{_f(f['float16'])} (float16). So on Linux a model runs fastest with float32 activations and scales: "
            "a 4-bit checkpoint with half-precision scales (as mlx-community publishes them) is smaller but decodes "
            f"{_f(q['float32'] / q['bfloat16'], 0)}-{_f(q['float32'] / q['float16'], 0)}x slower than the same weights "
            "with float32 scales, which cost half a bit per weight more at group size 64. The roofline fractions "
            "above are small for the same reason."
        )
    if k and kb:
        lines.append(
            f"- OpenBLAS changes only float32 matrix products (matmul {_f(k['matmul float32 (GFLOP/s)'], 1)} -> "
            f"{_f(kb['matmul float32 (GFLOP/s)'], 1)} GFLOP/s here); float16, bfloat16 and quantized products use "
            "MLX's own kernels either way. So preloading it speeds up float32 models (prefill most), not 4-bit or half ones."
        )
    lines.append(
        "- x mlx-lm compares the same weights, prompt and token count in the same run; the [min-max] ranges show "
        "how much this shared machine moved between rounds. A ratio whose ranges overlap is not a measured difference."
    )
    lines.append(
        "- transformers runs float32 through torch's own BLAS; it is the reference implementation, not a speed target."
    )
    shares = [
        (key, label, pr["model_code_share"])
        for key, m in r["models"].items()
        for label, pr in (m.get("profiles") or {}).items()
        if "model_code_share" in pr
    ]
    if shares:
        worst = max(shares, key=lambda t: t[2])
        lines.append(
            f"- Profiles: Python building the forward graph (model code, layers, hook points) is at most "
            f"{100 * worst[2]:.1f}% of a trial's samples ({worst[0]}, {worst[1]}); the rest is the Python thread "
            "inside MLX calls (`mx.async_eval`, `.item()`) while the CPU computes. Hooks and captures cost no "
            "measurable Python time here; speed comes from the kernels and from how much arithmetic is asked for."
        )
    return lines + [""]


def _openblas_howto(r: dict[str, Any]) -> list[str]:
    return [
        "## OpenBLAS on Linux (how to)",
        "",
        "The `mlx[cpu]` wheel links a bundled reference BLAS. Debian/Ubuntu's OpenBLAS exports the same CBLAS symbols, "
        "and `import mlx_engine` loads it before MLX when it is installed, so MLX's float32 matrix products use it "
        "with nothing preloaded (`MLX_ENGINE_NO_OPENBLAS=1` opts out; `MLX_ENGINE_OPENBLAS` names another library):",
        "",
        "```sh",
        "sudo apt-get install libopenblas0-pthread",
        "mlx-engine serve --model ...   # OpenBLAS, found by mlx_engine/blas.py",
        "```",
        "",
        "The rows marked `LD_PRELOAD=OpenBLAS` above preload it by hand; `benchmarks/RESULTS-blas-paths.md` sets the "
        "default path (nothing set) beside it. It helps float32 checkpoints (see the kernel table); float16, bfloat16 "
        "and quantized models do not use BLAS in MLX's CPU backend.",
        "",
    ]


def write_report(r: dict[str, Any], path: Path) -> None:
    m = r["machine"]
    lines = [
        "# mlx-engine benchmark results",
        "",
        f"Generated by `{r['command']}` (run from the repository root), {r['started']} to {r['finished']}. "
        "Nothing in this file is typed by hand: `benchmarks/report.py` writes it from `results.json` of the same run.",
        "",
    ]
    if r["quick"]:
        lines += ["**Quick mode**: a tiny model and a few tokens, to check the harness; these figures say nothing about speed.", ""]
    lines += [
        "## Machine and versions",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in m.items()],
        f"| load average at end | {r.get('load_average_end')} |",
        *[f"| {k} | {v} |" for k, v in r["versions"].items()],
        "",
        "## Targets",
        "",
        "| target | measured | verdict | why, and what would close it |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in target_rows(r)],
        "",
        "## Decode and prefill",
        "",
        f"Memory read bandwidth (numpy sum over {r['bandwidth']['bytes'] / GIB:.2f} GiB, one thread, best of 5): "
        f"{_f(r['bandwidth']['gb_per_s'], 1)} GB/s.",
        "",
    ]
    for key, model in r["models"].items():
        lines += _model_section(key, model, r)
    g = r.get("gpt_oss_20b")
    if g:
        lines += ["## gpt-oss-20b shape (synthetic, 4-bit)", "", f"Made by `{g['synth_command']}` (then deleted: {g.get('deleted')})."]
        if "error" in g:
            lines.append(f"\nFailed: {g['error']}")
        else:
            achieved = g["bytes_per_token"] * g["decode_tps"] / 1e9
            lines += [
                "",
                f"- checkpoint {g['checkpoint_bytes'] / GIB:.2f} GiB, written in {_f(g['synth_s'], 0)} s with "
                f"{g['synth_peak_rss'] / GIB:.2f} GiB peak RSS",
                f"- load {_f(g['load_s'], 1)} s; peak RSS while decoding {g['peak_rss'] / GIB:.2f} GiB",
                f"- decode {_f(g['decode_tps'], 3)} tok/s, prefill {_f(g['prefill_tps'], 2)} tok/s "
                f"({g['prompt_tokens']}-token prompt, {g['decode_tokens']} tokens, median of 2 trials after a short warm-up)",
                f"- a decode step reads {g['bytes_per_token'] / GIB:.2f} GiB of weights: {_f(achieved, 2)} GB/s, "
                f"{_f(100 * achieved / r['bandwidth']['gb_per_s'], 1)}% of the measured bandwidth",
                *_layout_sizes(),
            ]
        lines.append("")
    lines += _wire_section(r)
    lines += _kernels_section(r)
    lines += _meaning(r)
    lines += _openblas_howto(r)
    lines += ["## Other benchmarks", "",
              "Each writes its own generated report beside this one, from its own run:", "",
              "- `RESULTS-long-prompts.md`: prefill seconds and peak memory at 512 to 8192 prompt tokens against "
              "transformers, and the ops of one layer in MLX against torch (`python -m benchmarks.long_prompts`).",
              "- `RESULTS-blas-paths.md`: prefill with nothing set (mlx_engine loads OpenBLAS itself) against OpenBLAS "
              "preloaded by hand and the bundled reference BLAS (`python -m benchmarks.blas_paths`).",
              "- `RESULTS-research.md`: corpus extraction tokens/s against hooks-off prefill, a run_with_cache loop, "
              "transformers and TransformerLens, peak memory against corpus size and 2 data-parallel ranks "
              "(`python -m benchmarks.extraction`); the neuron analyses' seconds and peak memory on a store of 1024 "
              "neurons (`python -m benchmarks.store_analysis`); joined by `python -m benchmarks.research_report`; "
              "`RESULTS-extraction-small-model.md`: the same with a 2-layer model, its peak memory at 1M against 100k "
              "tokens (`--small-model`).",
              "- `RESULTS-sae.md`: TopK SAE training here against SAELens's trainer on the same batches (tokens/s, "
              "held-out FVE and L0, peak memory), and decode tok/s with an SAE's top-k features streamed against hooks "
              "off (`python -m benchmarks.sae_training`).",
              "- `RESULTS-concurrency.md`: aggregate tokens/s and latency of 1 to 16 concurrent streaming clients against "
              "ours (plain and with a residual capture) and mlx-lm's server, and time to first token of a repeated long "
              "prompt with and without the prompt cache (`python -m benchmarks.concurrency`); "
              "`RESULTS-concurrency-llama-125m.md` the same against a model whose weights outgrow the CPU's caches "
              "(`--model llama-125m-f32`).",
              "- `RESULTS-batch-decode.md`: aggregate decode tokens/s of 1 to 8 rows batched in the engine alone (no "
              "server), ours against mlx-lm's BatchGenerator, on the default model and llama-125m "
              "(`python -m benchmarks.batch_decode`).",
              "- `RESULTS-distributed.md`: decode tokens/s and peak memory per rank, 1 and 2 ranks, tensor and pipeline, "
              "hooks off and on, and the cost of the gathers (`python -m benchmarks.distributed`).", ""]
    path.write_text("\n".join(lines))
