"""The training run: seeding, the loop, evaluation, samples and the training report.

A randomly initialised model would do for plumbing, but its activations mean nothing, so the
default model is trained for real (if tiny): transformers + PyTorch on two CPU cores in about
a quarter of an hour, scheduled by wall-clock time unless --max-steps is given.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import log
from .data import PreparedData, held_out_windows, prepare_data, training_batches
from .model import build_model, count_parameters, learning_rate, make_optimizer
from .report import environment_section, evaluation_section, model_section, training_section, write_report

# Prompts for the text samples in the report. They end where a token ends: a prompt with a
# trailing space ("def ") leaves a lone space token that byte-level BPE almost never produces
# before a word, so the model would be asked to continue from a state it has not seen.
SAMPLE_PROMPTS = ("def", "import")
CHAT_SAMPLE_REQUEST = "Write a Python function `is_even(n)`. Return True if *n* is even."


def evaluate(model: Any, eval_windows: np.ndarray, batch_size: int, with_routing: bool = False) -> dict[str, Any]:
    """Mean next-token cross-entropy (nats) over the windows; optionally how often each
    expert of each layer is chosen, to show no expert is dead."""
    import torch

    model.eval()
    total_nll, total_tokens = 0.0, 0
    counts: np.ndarray | None = None
    with torch.no_grad():
        for start in range(0, len(eval_windows), batch_size):
            batch = torch.from_numpy(eval_windows[start : start + batch_size].astype(np.int64))
            out = model(input_ids=batch[:, :-1], output_router_logits=with_routing)
            logits = out.logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
            if with_routing and out.router_logits is not None:
                k = model.config.num_experts_per_tok
                layer_counts = []
                for layer_logits in out.router_logits:
                    chosen = torch.topk(layer_logits, k, dim=-1).indices.reshape(-1)
                    layer_counts.append(np.bincount(chosen.numpy(), minlength=model.config.num_local_experts))
                stacked = np.stack(layer_counts)
                counts = stacked if counts is None else counts + stacked
    model.train()
    result: dict[str, Any] = {"loss": total_nll / max(1, total_tokens), "tokens": total_tokens}
    if counts is not None:
        result["expert_load"] = (counts / counts.sum(axis=1, keepdims=True)).round(4).tolist()
    return result


def unigram_cross_entropy(train_stream: np.ndarray, val_stream: np.ndarray, vocab_size: int) -> float:
    """Held-out cross-entropy of add-one-smoothed training token frequencies: the loss of a
    model that ignores context, so the gap to it is what the network learned about context."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_stream[1:]].mean())


def generate_samples(model: Any, tokenizer: Any, max_new_tokens: int, seed: int) -> dict[str, Any]:
    """Greedy and sampled continuations of code prompts, and one chat answer."""
    import torch

    model.eval()
    samples: dict[str, Any] = {"code": [], "chat": {}}

    def run(ids: list[int], sample: bool) -> list[int]:
        torch.manual_seed(seed)
        kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens}
        if sample:
            kwargs.update(temperature=0.8, top_p=0.95, top_k=0)
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs)
        return out[0, len(ids) :].tolist()

    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        samples["code"].append(
            {
                "prompt": prompt,
                "greedy": prompt + tokenizer.decode(run(ids, False), skip_special_tokens=False),
                "sampled (temperature 0.8, top_p 0.95)": prompt
                + tokenizer.decode(run(ids, True), skip_special_tokens=False),
            }
        )
    messages = [{"role": "user", "content": CHAT_SAMPLE_REQUEST}]
    chat_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_ids = tokenizer(chat_prompt, add_special_tokens=False)["input_ids"]
    samples["chat"] = {
        "messages": messages,
        "prompt": chat_prompt,
        "greedy_completion": tokenizer.decode(run(chat_ids, False), skip_special_tokens=False),
    }
    model.train()
    return samples


class AdaptiveThreads:
    """Keeps torch on whichever thread count (1 .. ``max_threads``) is currently faster.

    On an idle machine two threads nearly halve a step; when other jobs share the cores,
    every parallel region waits for its slowest thread and one thread can be several times
    faster. Which case holds changes during a run, so every ``probe_every`` steps a few
    steps run at another count and the faster median wins. Probe steps are ordinary
    training steps, so nothing is wasted but the switch.
    """

    def __init__(self, max_threads: int, probe_every: int = 100, probe_steps: int = 4) -> None:
        import torch

        self.torch = torch
        self.max_threads = max(1, max_threads)
        self.current = self.max_threads
        self.probe_every = probe_every
        self.probe_steps = probe_steps
        self.recent: list[float] = []
        self.probe: list[float] = []
        self.probing: int | None = None
        self.steps_since_probe = 0
        self.switches = 0
        torch.set_num_threads(self.current)

    def _alternative(self) -> int:
        return 1 if self.current != 1 else self.max_threads

    def record(self, step_seconds: float) -> None:
        """Feed one step's duration; may change the thread count for the next step."""
        if self.max_threads == 1:
            return
        if self.probing is not None:
            self.probe.append(step_seconds)
            if len(self.probe) >= self.probe_steps:
                baseline = float(np.median(self.recent[-self.probe_steps :]))
                trial = float(np.median(self.probe))
                if trial < 0.9 * baseline:
                    self.current = self.probing
                    self.switches += 1
                    log(f"threads -> {self.current} (step {trial:.2f}s vs {baseline:.2f}s)")
                self.torch.set_num_threads(self.current)
                self.probing = None
                self.probe = []
                self.recent = []
                self.steps_since_probe = 0
            return
        self.recent.append(step_seconds)
        self.steps_since_probe += 1
        if self.steps_since_probe >= self.probe_every and len(self.recent) >= self.probe_steps:
            self.probing = self._alternative()
            self.torch.set_num_threads(self.probing)


@dataclass
class LoopState:
    """The training loop's counters, in one place so the step, logging and evaluation
    helpers share them instead of passing a dozen values back and forth."""

    train_start: float
    budget_s: float
    max_steps: int
    last_eval: float
    last_log: float
    step: int = 0
    tokens_seen: int = 0
    ema_loss: float | None = None
    ema_aux: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def progress(self) -> float:
        """Where the run is in [0, 1] for the schedule: by steps with --max-steps, else by time."""
        if self.max_steps:
            return self.step / self.max_steps
        return (time.perf_counter() - self.train_start) / self.budget_s

    def done(self) -> bool:
        """The time budget is spent, or --max-steps steps are done (whichever comes first)."""
        elapsed = time.perf_counter() - self.train_start
        return elapsed >= self.budget_s or bool(self.max_steps and self.step >= self.max_steps)


def optimization_step(model: Any, optimizer: Any, batch: np.ndarray, lr: float, args: argparse.Namespace) -> tuple[Any, Any, int]:
    """One AdamW update on one batch of windows; returns the cross-entropy and router aux
    loss tensors and the number of input tokens. The aux loss only joins the loss when it has
    a weight, since without one the router logits need not even be returned."""
    import torch

    for group in optimizer.param_groups:
        group["lr"] = lr
    tokens = torch.from_numpy(batch.astype(np.int64))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    out = model(input_ids=inputs, output_router_logits=args.router_aux_coef > 0)
    logits = out.logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss = ce
    if args.router_aux_coef > 0 and out.aux_loss is not None:
        loss = ce + args.router_aux_coef * out.aux_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    return ce, out.aux_loss, inputs.numel()


def record_losses(state: LoopState, ce: Any, aux_loss: Any, n_tokens: int) -> None:
    """Count the step and fold its losses into the moving averages the log shows (single
    steps are too noisy to read); stop at once if the loss stopped being a number."""
    state.step += 1
    state.tokens_seen += n_tokens
    ce_value = ce.item()
    if not math.isfinite(ce_value):
        raise SystemExit(f"training diverged at step {state.step} (loss {ce_value}); lower --lr")
    state.ema_loss = ce_value if state.ema_loss is None else 0.95 * state.ema_loss + 0.05 * ce_value
    if aux_loss is not None:
        aux = aux_loss.item()
        state.ema_aux = aux if state.ema_aux is None else 0.95 * state.ema_aux + 0.05 * aux


def report_progress(state: LoopState, bar: Any, lr: float, now: float, log_every_s: float) -> None:
    """Update the progress bar every step and write a log line every ``log_every_s``."""
    elapsed = now - state.train_start
    bar.n = min(int(elapsed), int(state.budget_s))
    bar.set_postfix(step=state.step, loss=f"{state.ema_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{state.tokens_seen / elapsed:.0f}")
    if now - state.last_log >= log_every_s:
        state.last_log = now
        log(
            f"step {state.step:5d}  {elapsed:6.0f}s  train loss {state.ema_loss:.3f}  "
            f"router aux {state.ema_aux if state.ema_aux is not None else float('nan'):.3f}  lr {lr:.2e}  "
            f"{state.tokens_seen / elapsed:.0f} tok/s"
        )


def maybe_evaluate(
    state: LoopState, model: Any, quick_windows: np.ndarray, lr: float, now: float, args: argparse.Namespace
) -> None:
    """Every ``--eval-every-s``, score the held-out subset and add a point to the history,
    so the report shows whether held-out loss was still falling when training stopped."""
    if now - state.last_eval < args.eval_every_s:
        return
    state.last_eval = now
    ev = evaluate(model, quick_windows, args.batch_size)
    state.history.append(
        {
            "step": state.step,
            "seconds": round(now - state.train_start, 1),
            "tokens_seen": state.tokens_seen,
            "train_loss_ema": round(state.ema_loss, 4),
            "held_out_loss_subset": round(ev["loss"], 4),
            "lr": lr,
        }
    )
    log(f"step {state.step:5d}  held-out loss (subset) {ev['loss']:.3f}  train loss {state.ema_loss:.3f}")


def run_loop(
    model: Any,
    optimizer: Any,
    batches: Iterator[np.ndarray],
    quick_windows: np.ndarray,
    threads: AdaptiveThreads | None,
    bar: Any,
    state: LoopState,
    args: argparse.Namespace,
) -> None:
    """Step until the budget is spent. The first step is not timed for AdaptiveThreads: it
    pays one-off warm-up costs that say nothing about the thread count."""
    while not state.done():
        step_start = time.perf_counter()
        lr = learning_rate(state.step, state.progress(), args.lr, args.warmup_steps, args.min_lr_ratio)
        ce, aux_loss, n_tokens = optimization_step(model, optimizer, next(batches), lr, args)
        if threads is not None and state.step > 0:
            threads.record(time.perf_counter() - step_start)
        record_losses(state, ce, aux_loss, n_tokens)
        now = time.perf_counter()
        report_progress(state, bar, lr, now, args.log_every_s)
        maybe_evaluate(state, model, quick_windows, lr, now, args)


def train_model(
    model: Any, optimizer: Any, data: PreparedData, quick_windows: np.ndarray, args: argparse.Namespace
) -> tuple[LoopState, AdaptiveThreads | None, float]:
    """The training loop with its clock, thread control and progress bar; returns the final
    loop state, the thread controller (for its switch count) and the loop's seconds."""
    from tqdm import tqdm

    batches = training_batches(data.train_stream, args.seq_len, args.batch_size, args.seed)
    budget_s = args.time_budget_min * 60.0
    model.train()
    train_start = time.perf_counter()
    state = LoopState(train_start, budget_s, args.max_steps, last_eval=train_start, last_log=train_start)
    threads = AdaptiveThreads(args.threads) if args.adaptive_threads else None
    bar = tqdm(total=int(budget_s), unit="s", desc="training", disable=None, dynamic_ncols=True)
    run_loop(model, optimizer, batches, quick_windows, threads, bar, state, args)
    bar.close()
    train_seconds = time.perf_counter() - train_start
    log(f"trained {state.step} steps, {state.tokens_seen:,} tokens in {train_seconds:.0f}s; final evaluation on all held-out text")
    return state, threads, train_seconds


def score_held_out(
    model: Any, data: PreparedData, all_windows: np.ndarray, bytes_per_token: float, batch_size: int
) -> dict[str, Any]:
    """The report's evaluation section: held-out loss on all held-out text, beside the
    uniform and unigram baselines that say how much of it the model actually learned, and
    in bits per byte, which does not depend on the tokenizer."""
    final = evaluate(model, all_windows, batch_size, with_routing=True)
    vocab = len(data.tokenizer)
    uniform = math.log(vocab)
    unigram = unigram_cross_entropy(data.train_stream, data.val_stream, vocab)
    held_out = final["loss"]
    log(
        f"held-out loss {held_out:.3f} nats/token (perplexity {math.exp(held_out):.1f}); "
        f"uniform {uniform:.3f}, unigram {unigram:.3f}; "
        f"{held_out / math.log(2) / bytes_per_token:.3f} bits/byte"
    )
    return evaluation_section(held_out, final, uniform, unigram, bytes_per_token)


def log_samples(samples: dict[str, Any]) -> None:
    """The samples in the log too, so a run can be judged without opening the report."""
    for s in samples["code"]:
        log(f"greedy  {s['prompt']!r}: {s['greedy']!r}")
        log(f"sampled {s['prompt']!r}: {s['sampled (temperature 0.8, top_p 0.95)']!r}")
    log(f"chat    {samples['chat']['greedy_completion']!r}")


def log_data(data: PreparedData, prep_seconds: float, bytes_per_token: float) -> None:
    """What the data step produced, before the slow part starts."""
    d = data.description
    log(
        f"data ready in {prep_seconds:.0f}s: {d['files_train']} train files "
        f"({data.train_stream.size:,} tokens, {d['chat_conversations']} chat conversations), "
        f"{d['files_held_out']} held-out files ({data.val_stream.size:,} tokens, "
        f"{bytes_per_token:.2f} bytes/token)"
    )


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare the data, train, evaluate and sample, and write the float checkpoint, its
    tokenizer and ``training_report.json`` to ``--out``; returns the report.

    Every random source is seeded from --seed, so with --max-steps (and a fixed thread
    count) a run is repeatable; with a time budget the step count depends on the machine.
    """
    import torch

    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    out_dir = Path(args.out).resolve()
    log(f"collecting stdlib sources and training the tokenizer (vocab {args.vocab_size})")
    data = prepare_data(args)
    prep_seconds = time.perf_counter() - wall_start
    bytes_per_token = data.val_bytes / max(1, data.val_stream.size)
    log_data(data, prep_seconds, bytes_per_token)

    model = build_model(args, data.tokenizer)
    n_params, n_active = count_parameters(model, args)
    log(f"model: {n_params:,} parameters ({n_active:,} active per token)")
    optimizer = make_optimizer(model, args)
    all_windows, quick_windows = held_out_windows(data.val_stream, args.seq_len, args.eval_windows)

    state, threads, train_seconds = train_model(model, optimizer, data, quick_windows, args)
    evaluation = score_held_out(model, data, all_windows, bytes_per_token, args.batch_size)
    samples = generate_samples(model, data.tokenizer, args.sample_tokens, args.seed)
    log_samples(samples)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    data.tokenizer.save_pretrained(out_dir)

    report = {
        "model": model_section(args, model, n_params, n_active, len(data.tokenizer)),
        "training": training_section(args, state, threads, data, train_seconds, prep_seconds, wall_start),
        "evaluation": evaluation,
        "data": data.description,
        "samples": samples,
        "environment": environment_section(),
    }
    report["training"]["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
    write_report(out_dir, report)
    log(f"wrote {out_dir} (total wall time {report['training']['wall_seconds']:.0f}s)")
    return report
