"""Streaming generation: prefill in chunks, then one token a step, pipelined like mlx-lm.

The loop enqueues pass k+1 before it hands token k out (so the device never idles
while Python detokenizes). Captures ride with their pass: the captures handed out with
token k are those of the pass whose logits chose token k, and a pass enqueued for a
token that turns out to be the last is never handed out.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .generation_types import GenerationResult, TokenLogprob
from .hooks.capture import Capture, StepActivations
from .model_kit import ModelKit

DEFAULT_PREFILL_STEP = 512


class PassRecorder(Protocol):
    """What the loop needs from a capture session: bracket each forward pass."""

    def begin_pass(self, step: int, start: int, end: int) -> None: ...

    def end_pass(self) -> list[Capture]: ...


class StopStringMatcher:
    """Holds back text that could be the start of a stop string, so none leaks."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stops = [s for s in stop_strings if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(i for i, _ in hits)
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _validate(prompt_tokens: Sequence[int], max_tokens: int, vocab_size: int) -> None:
    if len(prompt_tokens) == 0:
        raise ValueError("The prompt is empty: give at least one token.")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
    bad = [t for t in prompt_tokens if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"Prompt token ids out of range [0, {vocab_size}): {bad[:5]}")


def generate_steps(
    kit: ModelKit,
    prompt_tokens: Sequence[int],
    *,
    recorder: Optional[PassRecorder] = None,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
    stop_strings: Sequence[str] = (),
    top_logprobs: int = 0,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
) -> Iterator[tuple[GenerationResult, StepActivations]]:
    """The engine's one generation loop; `recorder` (if any) brackets each forward pass."""
    model = kit.model
    _validate(prompt_tokens, max_tokens, kit.arch_info.vocab_size)
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p if 0 < top_p < 1 else 0.0, min_p=min_p, top_k=top_k)
    cache = make_prompt_cache(model)
    n_prompt = len(prompt_tokens)
    prompt = mx.array(prompt_tokens, dtype=mx.uint32)
    # Our models can skip the LM head on prompt positions whose logits nobody reads;
    # mlx-lm's fallback classes compute it for all of them.
    head_kwargs = {"last_only": True} if kit.native else {}

    def forward(tokens: mx.array, step: int, start: int) -> tuple[mx.array, list[Capture]]:
        if recorder is not None:
            recorder.begin_pass(step, start, start + tokens.size)
        logits = model(tokens[None], cache=cache, **head_kwargs)[:, -1, :]
        captures = recorder.end_pass() if recorder is not None else []
        return logits, captures

    def choose(logits: mx.array) -> tuple[mx.array, mx.array]:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs

    def enqueue(token: mx.array, logprobs: mx.array, captures: list[Capture]) -> tuple[mx.array, ...]:
        # Everything read back for this token (its logprob, the top alternatives) is built
        # into this pass's graph: an op made later would queue on the stream behind the
        # next pass, and reading it would wait for that whole pass.
        chosen = logprobs[token]
        picked: tuple[mx.array, ...] = (chosen,)
        if top_logprobs > 0:
            k = min(top_logprobs, logprobs.size)
            ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
            order = mx.argsort(-logprobs[ids])
            picked = (chosen, ids[order], logprobs[ids][order])
        arrays = [token, *picked]  # the vocab-sized logprobs stay an intermediate
        for c in captures:
            arrays.append(c.array)
            arrays.extend(c.extras.values())
            if isinstance(c.key_positions, mx.array):
                arrays.append(c.key_positions)
        mx.async_eval(*arrays)
        return picked

    mx.reset_peak_memory()
    tic = time.perf_counter()
    # Step 0: the prompt, in chunks; only the last chunk's logits choose a token.
    step0: list[Capture] = []
    for start in range(0, n_prompt, prefill_step_size):
        chunk = prompt[start : start + prefill_step_size]
        logits, captures = forward(chunk, 0, start)
        step0.extend(captures)
        if start + prefill_step_size < n_prompt:
            mx.eval([c.state for c in cache], [c.array for c in captures])
    token, logprobs = choose(logits)
    token = token.squeeze(0)
    logprobs = logprobs.squeeze(0)
    current = (token, step0, enqueue(token, logprobs, step0))

    detokenizer = kit.tokenizer.detokenizer
    stopper = StopStringMatcher(stop_strings)
    eos = kit.eos_token_ids
    prompt_tps = 0.0
    gen_tic = tic
    for n in range(max_tokens):
        token, captures, picked = current
        if n + 1 < max_tokens:
            next_logits, next_captures = forward(token.reshape(1), n + 1, n_prompt + n)
            next_token, next_logprobs = choose(next_logits)
            next_token, next_logprobs = next_token.squeeze(0), next_logprobs.squeeze(0)
            current = (next_token, next_captures, enqueue(next_token, next_logprobs, next_captures))
        token_id = token.item()
        if n == 0:
            prompt_tps = n_prompt / (time.perf_counter() - tic)
            gen_tic = time.perf_counter()

        finish: Optional[str] = None
        if token_id in eos:
            detokenizer.finalize()
            text = stopper.push(detokenizer.last_segment)[0] + stopper.flush()
            finish = "stop"
        else:
            detokenizer.add_token(token_id)
            if n + 1 == max_tokens:
                detokenizer.finalize()
            text, hit = stopper.push(detokenizer.last_segment)
            if hit:
                finish = "stop"
            elif n + 1 == max_tokens:
                text += stopper.flush()
                finish = "length"

        top: list[TokenLogprob] = []
        if top_logprobs > 0:
            top = [TokenLogprob(int(i), float(v)) for i, v in zip(picked[1].tolist(), picked[2].tolist())]
        elapsed = time.perf_counter() - gen_tic
        result = GenerationResult(
            text=text,
            token=token_id,
            step=n,
            logprob=float(picked[0].item()),
            top_logprobs=top,
            finish_reason=finish,
            prompt_tokens=n_prompt,
            generation_tokens=n + 1,
            prompt_tps=prompt_tps,
            generation_tps=(n + 1) / elapsed if elapsed > 0 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
        )
        yield result, _group(captures)
        if finish is not None:
            break


def _group(captures: list[Capture]) -> StepActivations:
    grouped: StepActivations = {}
    for c in captures:
        if isinstance(c.key_positions, mx.array):
            c.key_positions = c.key_positions.tolist()
        grouped.setdefault(c.hook_id, []).append(c)
    return grouped


def create_generator(
    kit: ModelKit, prompt_tokens: Sequence[int], *, interventions: Optional[Iterable[Any]] = None, **generation_kwargs: Any
) -> Iterator[GenerationResult]:
    """Stream GenerationResults for a prompt (no captures).

    Keyword arguments: max_tokens, temp, top_p, top_k, min_p, seed, stop_strings,
    top_logprobs, prefill_step_size, and `interventions` (see mlx_engine.interventions),
    which are checked here, before the first token is asked for.
    """
    interventions = list(interventions or ())
    if interventions:
        from .activations import create_generator_with_activations

        steps = create_generator_with_activations(kit, prompt_tokens, (), interventions=interventions, **generation_kwargs)
    else:
        steps = generate_steps(kit, prompt_tokens, **generation_kwargs)
    return _results(steps)


def _results(steps: Iterator[tuple[GenerationResult, StepActivations]]) -> Iterator[GenerationResult]:
    try:
        for result, _ in steps:
            yield result
    finally:
        steps.close()  # type: ignore[attr-defined]  # disarms an intervention session at once
