"""The engine's one generation loop: prefill in chunks, then one token a pass, pipelined like mlx-lm.

It deals in tokens, logprobs and captures only (text is text.py's job). The loop
enqueues pass k+1 before it hands token k out, so the device never idles while Python
works; captures ride with their pass: the captures handed out with token k are those of
the pass whose logits chose token k, and a pass enqueued for a token that turns out to
be the last is never handed out. The caller ends the generation by closing the iterator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol, Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from ..hooks.capture import Capture, StepActivations
from ..loading import ModelKit
from .sampling import KeyedSampler
from .types import TokenLogprob

DEFAULT_PREFILL_STEP = 512


class PassRecorder(Protocol):
    """What the loop needs from a hook session: bracket each forward pass."""

    def begin_pass(self, step: int, start: int, end: int) -> None: ...

    def end_pass(self) -> list[Capture]: ...


@dataclass
class TokenStep:
    """One generated token with what its pass produced."""

    token: int
    step: int
    logprob: float
    top_logprobs: list[TokenLogprob]
    activations: StepActivations
    prompt_tps: float
    generation_tps: float


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen, and how much is read back per token."""

    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    top_logprobs: int = 0
    prefill_step_size: int = DEFAULT_PREFILL_STEP


class GenerationCancelled(Exception):
    """`should_stop` said stop between two prefill chunks: the rest of the prompt never ran.

    A long prompt is many chunks; checking between them lets a caller whose client left
    free the device within one chunk instead of after the whole prefill.
    """

    def __init__(self, done_tokens: int, prompt_tokens: int) -> None:
        super().__init__(f"generation cancelled after prefilling {done_tokens} of {prompt_tokens} prompt tokens")
        self.done_tokens = done_tokens
        self.prompt_tokens = prompt_tokens


def check_prompt(prompt_tokens: Sequence[int], max_tokens: int, vocab_size: int) -> None:
    if len(prompt_tokens) == 0:
        raise ValueError("The prompt is empty: give at least one token.")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
    bad = [t for t in prompt_tokens if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"Prompt token ids out of range [0, {vocab_size}): {bad[:5]}")


def group_captures(captures: list[Capture]) -> StepActivations:
    """A pass's captures by hook id, each settled (key positions as plain lists)."""
    grouped: StepActivations = {}
    for c in captures:
        c.settle()
        grouped.setdefault(c.hook_id, []).append(c)
    return grouped


def sampler_for(s: Sampling) -> KeyedSampler:
    return KeyedSampler(temp=s.temp, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k, seed=s.seed)


def head_kwargs(kit: ModelKit) -> dict[str, bool]:
    # Our models can skip the LM head on prompt positions whose logits nobody reads;
    # mlx-lm's fallback classes compute it for all of them.
    return {"last_only": True} if kit.native else {}


def choose(sampler: KeyedSampler, logits: mx.array) -> tuple[mx.array, mx.array]:
    """The token [] and the logprobs [vocab] for one row's logits [1, vocab]."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sampler(logprobs).squeeze(0), logprobs.squeeze(0)


def enqueue(token: mx.array, logprobs: mx.array, captures: list[Capture], top_logprobs: int) -> tuple[mx.array, ...]:
    """Start evaluating what is read back for one token: (logprob, [top ids, top logprobs])."""
    # Everything read back for this token is built into this pass's graph: an op made
    # later would queue on the stream behind the next pass, and reading it would wait
    # for that whole pass.
    picked: tuple[mx.array, ...] = (logprobs[token],)
    if top_logprobs > 0:
        k = min(top_logprobs, logprobs.size)
        ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
        order = mx.argsort(-logprobs[ids])
        picked = (picked[0], ids[order], logprobs[ids][order])
    arrays = [token, *picked]  # the vocab-sized logprobs stay an intermediate
    for c in captures:
        arrays.extend(c.lazy_arrays())
    mx.async_eval(*arrays)
    return picked


def read_top(picked: tuple[mx.array, ...]) -> list[TokenLogprob]:
    if len(picked) == 1:
        return []
    return [TokenLogprob(int(i), float(v)) for i, v in zip(picked[1].tolist(), picked[2].tolist())]


def prefill(
    kit: ModelKit,
    prompt_tokens: Sequence[int],
    recorder: PassRecorder,
    sampling: Sampling,
    cache: list,
    start: int = 0,
    should_stop: Optional[Callable[[], bool]] = None,
) -> tuple[mx.array, list[Capture]]:
    """Step 0: positions [start, len) of the prompt in chunks (the cache holds [0, start));
    the last chunk's logits [1, vocab] and every chunk's captures."""
    n_prompt, step = len(prompt_tokens), sampling.prefill_step_size
    if not 0 <= start < n_prompt:
        raise ValueError(f"prefill must run at least the last prompt position: start {start}, prompt of {n_prompt} tokens")
    prompt = mx.array(prompt_tokens, dtype=mx.uint32)
    kwargs = head_kwargs(kit)
    step0: list[Capture] = []
    for begin in range(start, n_prompt, step):
        if should_stop is not None and should_stop():
            raise GenerationCancelled(begin, n_prompt)
        chunk = prompt[begin : begin + step]
        recorder.begin_pass(0, begin, begin + chunk.size)
        logits = kit.model(chunk[None], cache=cache, **kwargs)[:, -1, :]
        captures = recorder.end_pass()
        step0.extend(captures)
        if begin + step < n_prompt:
            mx.eval([c.state for c in cache], [c.array for c in captures])
    return logits, step0


def token_steps(
    kit: ModelKit,
    prompt_tokens: Sequence[int],
    recorder: PassRecorder,
    sampling: Sampling,
    should_stop: Optional[Callable[[], bool]] = None,
) -> Iterator[TokenStep]:
    """Generate up to `sampling.max_tokens` tokens; `recorder` brackets each forward pass.

    `should_stop` is asked before each prefill chunk; when it answers True the prefill
    stops there with GenerationCancelled.
    """
    model = kit.model
    s = sampling
    check_prompt(prompt_tokens, s.max_tokens, kit.arch_info.vocab_size)
    sampler = sampler_for(s)
    cache = make_prompt_cache(model)
    n_prompt = len(prompt_tokens)
    kwargs = head_kwargs(kit)

    def forward(tokens: mx.array, step: int, start: int) -> tuple[mx.array, list[Capture]]:
        recorder.begin_pass(step, start, start + tokens.size)
        logits = model(tokens[None], cache=cache, **kwargs)[:, -1, :]
        return logits, recorder.end_pass()

    mx.reset_peak_memory()
    tic = time.perf_counter()
    logits, step0 = prefill(kit, prompt_tokens, recorder, s, cache, 0, should_stop)
    token, logprobs = choose(sampler, logits)
    current = (token, step0, enqueue(token, logprobs, step0, s.top_logprobs))

    prompt_tps = 0.0
    gen_tic = tic
    for n in range(s.max_tokens):
        token, captures, picked = current
        if n + 1 < s.max_tokens:
            next_logits, next_captures = forward(token.reshape(1), n + 1, n_prompt + n)
            next_token, next_logprobs = choose(sampler, next_logits)
            current = (next_token, next_captures, enqueue(next_token, next_logprobs, next_captures, s.top_logprobs))
        token_id = token.item()
        if n == 0:
            prompt_tps = n_prompt / (time.perf_counter() - tic)
            gen_tic = time.perf_counter()
        elapsed = time.perf_counter() - gen_tic
        yield TokenStep(
            token=token_id,
            step=n,
            logprob=float(picked[0].item()),
            top_logprobs=read_top(picked),
            activations=group_captures(captures),
            prompt_tps=prompt_tps,
            generation_tps=(n + 1) / elapsed if elapsed > 0 else 0.0,
        )
