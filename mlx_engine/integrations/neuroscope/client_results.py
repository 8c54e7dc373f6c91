"""What the NeuroScope Python client answers: decoded captures, whole and streamed generations.

Chat and text completions with activations answer the same fields (the capture fields, the
prompt's and generated tokens); only where the text sits differs (`choices[0].message.content`
or `choices[0].text`), so one result class and one stream class serve both. Numpy alone:
captures decode with `mlx_engine.wire.codec`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ...wire.codec import decode_capture, decode_capture_extras
from ...wire.fields import REQUIRED_FIELD_NAMES


def choice_text(choice: Mapping[str, Any]) -> str:
    """The text of a response's choice: a chat message's content, or a text completion's text."""
    message = choice.get("message")
    if message is not None:
        return message.get("content") or ""
    return choice.get("text") or ""


@dataclass
class DecodedCapture:
    """One wire capture with its data decoded (None when sent with the `none` encoding)."""

    hook_id: str
    layer_name: str
    layer: Optional[int]
    component: str
    step: int
    positions: tuple[int, int]
    key_positions: Optional[list[int]]
    is_input: bool
    shape: list[int]
    dtype: str
    encoding: str
    array: Optional[np.ndarray]
    extras: dict[str, Optional[np.ndarray]] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "DecodedCapture":
        missing = [name for name in REQUIRED_FIELD_NAMES if name not in obj]
        if missing:
            raise ValueError(f"not a wire capture: it lacks {', '.join(missing)}")
        return cls(
            hook_id=obj["hook_id"],
            layer_name=obj["layer_name"],
            layer=obj["layer"],
            component=obj["component"],
            step=obj["step"],
            positions=(obj["positions"][0], obj["positions"][1]),
            key_positions=obj.get("key_positions"),
            is_input=obj["is_input"],
            shape=list(obj["shape"]),
            dtype=obj["dtype"],
            encoding=obj["encoding"],
            array=decode_capture(obj),
            extras=decode_capture_extras(obj),
        )


def decode_activations(activations: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, list[DecodedCapture]]:
    return {hook: [DecodedCapture.from_wire(c) for c in caps] for hook, caps in activations.items()}


@dataclass
class ActivationResult:
    """A whole (non-streamed) chat or text completion with activations: the raw body and its decoded parts."""

    response: dict[str, Any]
    text: str
    captures: dict[str, list[DecodedCapture]]
    prompt_tokens: list[str]
    tokens: list[str]

    @classmethod
    def from_response(cls, body: dict[str, Any]) -> "ActivationResult":
        return cls(
            response=body,
            text=choice_text(body["choices"][0]),
            captures=decode_activations(body.get("activations") or {}),
            prompt_tokens=list(body.get("prompt_tokens_text") or []),
            tokens=list(body.get("generated_tokens_text") or []),
        )


@dataclass
class StreamChunk:
    """One SSE event of a streamed chat or text completion with activations."""

    text: str  # the visible content added by this event
    reasoning: str  # reasoning content (Harmony models) added by this event
    token_id: Optional[int]
    token_text: Optional[str]
    captures: dict[str, list[DecodedCapture]]
    finish_reason: Optional[str]
    chunk: dict[str, Any]  # the raw event


class ActivationStream:
    """Iterates the `StreamChunk`s of a streamed generation, keeping what a response holds.

    After iteration, `response()` gives the same shape as a non-streamed body (content,
    activations merged per hook in step order, token ids and strings), so the NeuroScope
    converter takes either. A text completion's stream (`object: text_completion`) gives a
    text completion's body, its choice holding `text` instead of a message.
    """

    def __init__(self, http_response: Any) -> None:
        self._http = http_response
        self._started = False
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._activations: dict[str, list[dict[str, Any]]] = {}
        self._first: dict[str, Any] = {}
        self._finish: Optional[str] = None
        self._token_ids: list[int] = []
        self._token_texts: list[str] = []
        self._usage: Optional[dict[str, Any]] = None
        self._done = False

    def __iter__(self) -> Iterator[StreamChunk]:
        if self._started:
            raise RuntimeError("an ActivationStream can be iterated once")
        self._started = True
        try:
            for chunk in iter_sse(self._http):
                yield self._absorb(chunk)
            self._done = True
        finally:
            self._http.close()

    def _absorb(self, chunk: dict[str, Any]) -> StreamChunk:
        if not self._first:
            self._first = chunk
        choices = chunk.get("choices") or []
        choice = choices[0] if choices else {}
        delta = choice.get("delta") or {}
        finish = choice.get("finish_reason")
        # A chat chunk adds its delta's content, a text completion's chunk its choice's text.
        text = (delta.get("content") or "") if "delta" in choice else (choice.get("text") or "")
        reasoning = delta.get("reasoning_content") or ""
        self._content.append(text)
        self._reasoning.append(reasoning)
        if finish is not None:
            self._finish = finish
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        acts = chunk.get("activations") or {}
        for hook, caps in acts.items():
            self._activations.setdefault(hook, []).extend(caps)
        token_id = chunk.get("token_id")
        token_text = chunk.get("token_text")
        if token_id is not None:
            self._token_ids.append(token_id)
            self._token_texts.append(token_text or "")
        return StreamChunk(text, reasoning, token_id, token_text, decode_activations(acts), finish, chunk)

    def response(self) -> dict[str, Any]:
        """The streamed generation as a non-streamed body would have carried it."""
        if not self._done:
            raise RuntimeError("iterate the stream to its end before asking for the whole response")
        text = "".join(self._content)
        if self._first.get("object") == "text_completion":
            obj, choice = "text_completion", {"index": 0, "text": text, "finish_reason": self._finish}
        else:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if any(self._reasoning):
                message["reasoning_content"] = "".join(self._reasoning)
            obj, choice = "chat.completion", {"index": 0, "message": message, "finish_reason": self._finish}
        return {
            "id": self._first.get("id"),
            "object": obj,
            "model": self._first.get("model"),
            "choices": [choice],
            "usage": self._usage,
            "capture_id": self._first.get("capture_id"),
            "activations": self._activations,
            "prompt_token_ids": self._first.get("prompt_token_ids") or [],
            "prompt_tokens_text": self._first.get("prompt_tokens_text") or [],
            "generated_token_ids": self._token_ids,
            "generated_tokens_text": self._token_texts,
        }


def iter_sse(http_response: Any) -> Iterator[dict[str, Any]]:
    """The JSON payloads of an SSE body, event by event, until `data: [DONE]`.

    Follows the SSE rules the server relies on: `data:` lines of one event are joined
    with newlines, a blank line ends the event, other fields and comments are ignored.
    """
    data: list[str] = []
    for raw in http_response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line == "":
            if data:
                payload = "\n".join(data)
                data = []
                if payload == "[DONE]":
                    return
                yield json.loads(payload)
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data and "\n".join(data) != "[DONE]":
        yield json.loads("\n".join(data))
