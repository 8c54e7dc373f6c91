"""Engine events -> OpenAI JSON (chat and text completions, whole or streamed).

The shapes follow OpenAI's API so its official client parses them; what this server
adds rides in extra fields the client keeps (`reasoning_content` for Harmony models;
`capture_id`, `activations` and token strings when activations were requested;
`interventions`, as the server resolved them, when the request sent any).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

from ..generation.harmony import Route
from .jobs import Finished, Started, Step


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ResponseShape:
    """What a response must contain, decided from the request."""

    id: str
    model: str
    logprobs: bool = False
    with_activations: bool = False
    include_usage: bool = False
    harmony: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def _bytes(text: str) -> Optional[list[int]]:
    # A token that is part of a multi-byte character decodes to U+FFFD; its true bytes are unknown here.
    return None if "\ufffd" in text else list(text.encode("utf-8"))


def token_logprob(step: Step) -> dict[str, Any]:
    return {
        "token": step.token_text,
        "logprob": step.logprob,
        "bytes": _bytes(step.token_text),
        "top_logprobs": [{"token": t.token_text, "logprob": t.logprob, "bytes": _bytes(t.token_text)} for t in step.top_logprobs],
    }


def usage(finished: Finished, harmony: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finished.cached_tokens},
    }
    if harmony:
        out["completion_tokens_details"] = {"reasoning_tokens": finished.reasoning_tokens}
    return out


@dataclass
class Collected:
    started: Started
    steps: list[Step]
    finished: Finished

    @property
    def content(self) -> str:
        return "".join(s.content for s in self.steps)

    @property
    def reasoning(self) -> str:
        return "".join(s.reasoning for s in self.steps)

    def activations(self) -> dict[str, list[dict[str, Any]]]:
        merged: dict[str, list[dict[str, Any]]] = {}
        for s in self.steps:
            for hook, caps in (s.activations or {}).items():
                merged.setdefault(hook, []).extend(caps)
        return merged

    def activation_fields(self) -> dict[str, Any]:
        return {
            "capture_id": self.finished.capture_id,
            "activations": self.activations(),
            "prompt_token_ids": self.started.prompt_token_ids,
            "prompt_tokens_text": self.started.prompt_tokens_text,
            "generated_token_ids": [s.token_id for s in self.steps],
            "generated_tokens_text": [s.token_text for s in self.steps],
        }


def collect(events: Iterable[Any]) -> Collected:
    it = iter(events)
    started = next(it)
    steps: list[Step] = []
    for event in it:
        if isinstance(event, Finished):
            return Collected(started, steps, event)
        steps.append(event)
    raise RuntimeError("The generation ended without a Finished event.")


# ----------------------------------------------------------------------------- chat


def chat_completion(shape: ResponseShape, done: Collected) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": done.content}
    if shape.harmony:
        message["reasoning_content"] = done.reasoning
    logprobs = None
    if shape.logprobs:
        logprobs = {"content": [token_logprob(s) for s in done.steps if s.route is Route.CONTENT]}
    body: dict[str, Any] = {
        "id": shape.id,
        "object": "chat.completion",
        "created": shape.created,
        "model": shape.model,
        "choices": [{"index": 0, "message": message, "finish_reason": done.finished.finish_reason, "logprobs": logprobs}],
        "usage": usage(done.finished, shape.harmony),
        "system_fingerprint": None,
    }
    if done.started.interventions is not None:
        body["interventions"] = done.started.interventions
    if shape.with_activations:
        body.update(done.activation_fields())
    return body


def _chunk(shape: ResponseShape, delta: dict[str, Any], finish_reason: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    if "logprobs" in extra:
        choice["logprobs"] = extra.pop("logprobs")
    chunk = {
        "id": shape.id,
        "object": "chat.completion.chunk",
        "created": shape.created,
        "model": shape.model,
        "choices": [choice],
    }
    chunk.update(extra)
    return chunk


def chat_chunks(shape: ResponseShape, events: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """The chunks of a streamed chat completion, one per engine event at most (plus usage)."""
    for event in events:
        extra: dict[str, Any]
        if isinstance(event, Started):
            extra = {}
            if event.interventions is not None:
                extra["interventions"] = event.interventions
            if shape.with_activations:
                extra.update(
                    capture_id=event.capture_id,
                    prompt_token_ids=event.prompt_token_ids,
                    prompt_tokens_text=event.prompt_tokens_text,
                )
            yield _chunk(shape, {"role": "assistant", "content": ""}, **extra)
        elif isinstance(event, Step):
            delta: dict[str, Any] = {}
            if event.content:
                delta["content"] = event.content
            if event.reasoning:
                delta["reasoning_content"] = event.reasoning
            extra = {}
            if shape.logprobs and event.route is Route.CONTENT:
                extra["logprobs"] = {"content": [token_logprob(event)]}
                delta.setdefault("content", "")
            if shape.with_activations:
                extra.update(activations=event.activations or {}, token_id=event.token_id, token_text=event.token_text)
            if delta or extra:
                yield _chunk(shape, delta, **extra)
        elif isinstance(event, Finished):
            extra = {"capture_id": event.capture_id} if shape.with_activations else {}
            yield _chunk(shape, {}, event.finish_reason, **extra)
            if shape.include_usage:
                yield {
                    "id": shape.id,
                    "object": "chat.completion.chunk",
                    "created": shape.created,
                    "model": shape.model,
                    "choices": [],
                    "usage": usage(event, shape.harmony),
                }


# ----------------------------------------------------------------------------- text completions


def _completion_logprobs(steps: list[Step], offset: int = 0) -> dict[str, Any]:
    offsets = []
    for s in steps:
        offsets.append(offset)
        offset += len(s.content)
    return {
        "tokens": [s.token_text for s in steps],
        "token_logprobs": [s.logprob for s in steps],
        "top_logprobs": [{t.token_text: t.logprob for t in s.top_logprobs} for s in steps],
        "text_offset": offsets,
    }


def text_completion(shape: ResponseShape, done: Collected) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": shape.id,
        "object": "text_completion",
        "created": shape.created,
        "model": shape.model,
        "choices": [
            {
                "index": 0,
                "text": done.content,
                "finish_reason": done.finished.finish_reason,
                "logprobs": _completion_logprobs(done.steps) if shape.logprobs else None,
            }
        ],
        "usage": usage(done.finished, False),
        "system_fingerprint": None,
    }
    if done.started.interventions is not None:
        body["interventions"] = done.started.interventions
    if shape.with_activations:
        body.update(done.activation_fields())
    return body


def completion_chunks(shape: ResponseShape, events: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """The chunks of a streamed text completion; resolved interventions ride on the first one.

    With activations, as in a chat stream: a first chunk names the capture and the prompt's
    tokens, every token gets a chunk with its id, text and its step's captures, and the last
    chunk repeats the capture id.
    """
    pending: Optional[list[dict[str, Any]]] = None

    def chunk(text: str, finish: Optional[str], logprobs: Optional[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        nonlocal pending
        out: dict[str, Any] = {
            "id": shape.id,
            "object": "text_completion",
            "created": shape.created,
            "model": shape.model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}],
        }
        if pending is not None:
            out["interventions"], pending = pending, None
        out.update(extra)
        return out

    offset = 0
    for event in events:
        if isinstance(event, Started):
            pending = event.interventions
            if shape.with_activations:
                yield chunk("", None, None, capture_id=event.capture_id, prompt_token_ids=event.prompt_token_ids,
                            prompt_tokens_text=event.prompt_tokens_text)
        elif isinstance(event, Step):
            if event.content or shape.logprobs or shape.with_activations:
                extra: dict[str, Any] = {}
                if shape.with_activations:
                    extra = {"activations": event.activations or {}, "token_id": event.token_id, "token_text": event.token_text}
                yield chunk(event.content, None, _completion_logprobs([event], offset) if shape.logprobs else None, **extra)
            offset += len(event.content)
        elif isinstance(event, Finished):
            yield chunk("", event.finish_reason, None, **({"capture_id": event.capture_id} if shape.with_activations else {}))
            if shape.include_usage:
                yield {
                    "id": shape.id,
                    "object": "text_completion",
                    "created": shape.created,
                    "model": shape.model,
                    "choices": [],
                    "usage": usage(event, False),
                }
