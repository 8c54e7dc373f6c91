"""Python REST client for the NeuroScope bridge, driven by `endpoints.ENDPOINTS`.

It uses the standard library's HTTP client so the bridge adds no runtime dependency,
reads Server-Sent Events line by line as they arrive, and decodes every capture into
numpy with `mlx_engine.encoding` (base64 is the default: several times faster than
JSON and exact).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from ...wire.codec import decode_capture, decode_capture_extras
from ...wire.fields import REQUIRED_FIELD_NAMES

from .endpoints import Endpoint, build_body, endpoint

Messages = Union[str, Sequence[Mapping[str, Any]]]
HookList = Sequence[Union[str, Mapping[str, Any]]]


class NeuroScopeError(RuntimeError):
    """An error the server reported (its `error.message`, with status, type, param, code)."""

    def __init__(
        self,
        message: str,
        status: int,
        type: Optional[str] = None,
        param: Optional[str] = None,
        code: Optional[str] = None,
    ) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code


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
    """A whole (non-streamed) chat with activations: the raw body and its decoded parts."""

    response: dict[str, Any]
    text: str
    captures: dict[str, list[DecodedCapture]]
    prompt_tokens: list[str]
    tokens: list[str]

    @classmethod
    def from_response(cls, body: dict[str, Any]) -> "ActivationResult":
        message = body["choices"][0]["message"]
        return cls(
            response=body,
            text=message.get("content") or "",
            captures=decode_activations(body.get("activations") or {}),
            prompt_tokens=list(body.get("prompt_tokens_text") or []),
            tokens=list(body.get("generated_tokens_text") or []),
        )


@dataclass
class StreamChunk:
    """One SSE event of a streamed chat with activations."""

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
    converter takes either.
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
        delta = choices[0].get("delta", {}) if choices else {}
        finish = choices[0].get("finish_reason") if choices else None
        text = delta.get("content") or ""
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
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self._content)}
        if any(self._reasoning):
            message["reasoning_content"] = "".join(self._reasoning)
        return {
            "id": self._first.get("id"),
            "object": "chat.completion",
            "model": self._first.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": self._finish}],
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


class NeuroScopeClient:
    """The mlx-engine server as NeuroScope uses it: models, hook points, hooks, chat with activations,
    activation stores, analyses and attached SAEs.

    `model` is the model requests name; `load_model` sets it, and it falls back to the
    server's first loaded model.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8080", api_key: Optional[str] = None, timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.model: Optional[str] = None

    # -- transport
    def _open(self, ep: Endpoint, body: Optional[dict[str, Any]], query: Optional[dict[str, Any]] = None, **path: str) -> Any:
        url = self.base_url + ep.render_path(**path)
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json, text/event-stream"}
        data = None
        if body is not None:
            data = json.dumps(body, allow_nan=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=data, method=ep.method, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise _server_error(exc) from None

    def _call(self, name: str, query: Optional[dict[str, Any]] = None, path: Optional[dict[str, str]] = None, **fields: Any) -> Any:
        ep = endpoint(name)
        with self._open(ep, build_body(ep, fields), query, **(path or {})) as response:
            return json.loads(response.read().decode("utf-8"))

    def current_model(self) -> str:
        """The model requests name: the one chosen, else the server's first loaded model."""
        if self.model is None:
            models = self.list_models()
            if not models:
                raise NeuroScopeError("the server has no model loaded; call load_model first", 404)
            self.model = models[0]["id"]
        return self.model

    # -- endpoints
    def health(self) -> dict[str, Any]:
        return self._call("health")

    def list_models(self) -> list[dict[str, Any]]:
        return self._call("models")["data"]

    def load_model(self, model: str) -> dict[str, Any]:
        described = self._call("load_model", model=model)
        self.model = described["id"]
        return described

    def hook_points(self, model_id: Optional[str] = None) -> dict[str, Any]:
        return self._call("hook_points", path={"model_id": model_id or self.current_model()})

    def register_hooks(self, hooks: HookList) -> list[dict[str, Any]]:
        return self._call("register_hooks", hooks=list(hooks), model=self.model)["data"]

    def clear_hooks(self) -> list[dict[str, Any]]:
        return self._call("clear_hooks", query={"model": self.model})["data"]

    def generate_with_activations(
        self,
        messages: Messages,
        hooks: HookList,
        stream: bool = False,
        activation_format: str = "base64",
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        interventions: Optional[Sequence[Mapping[str, Any]]] = None,
    ) -> Union[ActivationResult, ActivationStream]:
        """Chat and capture `hooks`; a bare string is one user message.

        With `stream=True` the result is an `ActivationStream` yielding each token's
        text and captures as the server produces them. `interventions` edit the model
        while it generates (the server's intervention dicts); captures show the edited run.
        """
        ep = endpoint("generate_with_activations")
        fields: dict[str, Any] = {
            "messages": [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages),
            "activation_hooks": list(hooks),
            "activation_format": activation_format,
            "stream": stream,
            "model": self.model,
        }
        if max_tokens is not None:
            fields["max_tokens"] = max_tokens
        if temperature is not None:
            fields["temperature"] = temperature
        if interventions is not None:
            fields["interventions"] = [dict(i) for i in interventions]
        http = self._open(ep, build_body(ep, fields))
        if stream:
            return ActivationStream(http)
        with http:
            return ActivationResult.from_response(json.loads(http.read().decode("utf-8")))

    # -- activation stores (read-only; ids from list_stores)
    def list_stores(self) -> list[dict[str, Any]]:
        return self._call("list_stores")["data"]

    def store_stats(self, store_id: str, hook: str) -> dict[str, Any]:
        """Per-neuron statistics (`neurons`) and the layer's `summary` of a stored hook."""
        return self._call("store_stats", query={"hook": hook}, path={"store_id": store_id})

    def top_examples(self, store_id: str, hook: str, neuron: int, k: int = 20, context: int = 8) -> list[dict[str, Any]]:
        """A neuron's top-activating examples, in Neuronpedia's fields (tokens, values, maxValue, maxValueTokenIndex)."""
        query = {"hook": hook, "neuron": neuron, "k": k, "context": context}
        return self._call("top_examples", query=query, path={"store_id": store_id})["examples"]

    def ngram_neurons(self, store_id: str, ngram: Union[str, Sequence[int]], hook: Optional[str] = None, k: int = 10) -> dict[str, Any]:
        """The neurons a token or n-gram (text, '#12 #40', or token ids) activates most, per hook."""
        text = ngram if isinstance(ngram, str) else ",".join(str(int(t)) for t in ngram)
        return self._call("ngram_neurons", query={"ngram": text, "hook": hook, "k": k}, path={"store_id": store_id})

    def neuron_ngrams(self, store_id: str, hook: str, neuron: int, n: int = 3, k: int = 10) -> dict[str, list[dict[str, Any]]]:
        """The n-grams of 1..n tokens with the largest mean activation of `neuron`, by length ('1', '2', ...)."""
        query = {"hook": hook, "neuron": neuron, "n": n, "k": k}
        return self._call("neuron_ngrams", query=query, path={"store_id": store_id})["ngrams"]

    # -- analyses on the client's model
    def logit_lens(self, prompt: Union[str, Sequence[int]], top_k: int = 5) -> dict[str, Any]:
        return self._call("logit_lens", prompt=_prompt(prompt), top_k=top_k, model=self.model)

    def attribution(self, prompt: Union[str, Sequence[int]], target: Optional[Union[str, int]] = None,
                    foil: Optional[Union[str, int]] = None, position: int = -1) -> dict[str, Any]:
        return self._call("attribution", prompt=_prompt(prompt), target=target, foil=foil, position=position, model=self.model)

    def head_scores(self, prompt: Union[str, Sequence[int]], repeat_length: int = 20, importance: bool = False) -> dict[str, Any]:
        return self._call("head_scores", prompt=_prompt(prompt), repeat_length=repeat_length, importance=importance, model=self.model)

    def patching(self, clean: Union[str, Sequence[int]], corrupted: Union[str, Sequence[int]], component: str = "residual",
                 metric: str = "logit_diff") -> dict[str, Any]:
        return self._call("patching", clean=_prompt(clean), corrupted=_prompt(corrupted), component=component, metric=metric,
                          model=self.model)

    # -- SAEs attached to the client's model
    def attach_sae(self, source: str, top_k: Optional[int] = None) -> dict[str, Any]:
        """Attach an SAE folder (under the server's --sae-root) or Hub id; the answer's `id` names its features."""
        return self._call("attach_sae", path={"model_id": self.current_model()}, source=source, top_k=top_k)

    def list_saes(self) -> list[dict[str, Any]]:
        return self._call("list_saes", path={"model_id": self.current_model()})["data"]

    def detach_sae(self, sae_id: str) -> list[dict[str, Any]]:
        return self._call("detach_sae", path={"model_id": self.current_model(), "sae_id": sae_id})["data"]


def _prompt(prompt: Union[str, Sequence[int]]) -> Union[str, list[int]]:
    return prompt if isinstance(prompt, str) else [int(t) for t in prompt]


def _server_error(exc: urllib.error.HTTPError) -> NeuroScopeError:
    """The server's error body as an exception; a non-JSON body is kept as the message."""
    text = exc.read().decode("utf-8", "replace")
    try:
        detail = json.loads(text)["error"]
        return NeuroScopeError(detail["message"], exc.code, detail.get("type"), detail.get("param"), detail.get("code"))
    except (ValueError, KeyError, TypeError):
        return NeuroScopeError(text or str(exc.reason), exc.code)
