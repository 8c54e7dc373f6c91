"""Python REST client for the NeuroScope bridge, driven by `endpoints.ENDPOINTS`.

It uses the standard library's HTTP client so the bridge adds no runtime dependency,
reads Server-Sent Events line by line as they arrive, and decodes every capture into
numpy with `mlx_engine.encoding` (base64 is the default: several times faster than
JSON and exact).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from .client_results import ActivationResult, ActivationStream, DecodedCapture, StreamChunk, decode_activations, iter_sse
from .endpoints import Endpoint, build_body, endpoint

__all__ = [
    "ActivationResult", "ActivationStream", "DecodedCapture", "NeuroScopeClient", "NeuroScopeError", "StreamChunk",
    "decode_activations", "iter_sse",
]

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


class NeuroScopeClient:
    """The mlx-engine server as NeuroScope uses it: models, hook points, hooks, chat and text completions
    with activations, activation stores, analyses, attached SAEs, extraction jobs and steering vectors.

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
        chat = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        return self._capture("generate_with_activations", {"messages": chat}, hooks, stream, activation_format, max_tokens,
                             temperature, interventions)

    def complete_with_activations(
        self,
        prompt: Union[str, Sequence[int]],
        hooks: HookList,
        stream: bool = False,
        activation_format: str = "base64",
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        interventions: Optional[Sequence[Mapping[str, Any]]] = None,
    ) -> Union[ActivationResult, ActivationStream]:
        """A text completion of the raw `prompt` (text without a chat template, or token ids), capturing `hooks`.

        Answers as `generate_with_activations` does (`text` is the completion's text).
        """
        return self._capture("complete_with_activations", {"prompt": _prompt(prompt)}, hooks, stream, activation_format,
                             max_tokens, temperature, interventions)

    def _capture(self, name: str, prompt: dict[str, Any], hooks: HookList, stream: bool, activation_format: str,
                 max_tokens: Optional[int], temperature: Optional[float],
                 interventions: Optional[Sequence[Mapping[str, Any]]]) -> Union[ActivationResult, ActivationStream]:
        ep = endpoint(name)
        fields: dict[str, Any] = {
            **prompt,
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

    def neuron_distribution(self, store_id: str, hook: str, neuron: int, bins: int = 64) -> dict[str, Any]:
        """A neuron's histogram over the store's rows (`edges`, `counts`), quartiles, outliers and online moments."""
        query = {"hook": hook, "neuron": neuron, "bins": bins}
        return self._call("neuron_distribution", query=query, path={"store_id": store_id})

    def polysemantic_neurons(self, store_id: str, hook: str, top: int = 20, neurons: Optional[Sequence[int]] = None,
                             k: Optional[int] = None, distance: Optional[float] = None) -> dict[str, Any]:
        """The hook's neurons (or `neurons`) ranked by polysemanticity; `neurons` in the answer holds the first `top`."""
        named = None if neurons is None else ",".join(str(int(n)) for n in neurons)
        query = {"hook": hook, "top": top, "neurons": named, "k": k, "distance": distance}
        return self._call("polysemantic_neurons", query=query, path={"store_id": store_id})

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


    # -- extraction jobs (stores written under the server's --store-root) and steering vectors
    def start_extraction(self, documents: Sequence[str], hooks: HookList, context_size: int = 1024, batch_size: int = 8,
                         max_tokens: Optional[int] = None, dtype: str = "float32", top_k: int = 20) -> dict[str, Any]:
        """Start a job writing the rows of `hooks` over `documents` to a new store; answers the job (`id`, `store`, `state`)."""
        return self._call("start_extraction", documents=list(documents), hooks=list(hooks), context_size=context_size,
                          batch_size=batch_size, max_tokens=max_tokens, dtype=dtype, top_k=top_k, model=self.model)

    def list_extractions(self) -> list[dict[str, Any]]:
        return self._call("list_extractions")["data"]

    def extraction_progress(self, job_id: str) -> dict[str, Any]:
        """The job's `state` (running, completed, cancelled, failed), documents and tokens done, tokens/s and ETA."""
        return self._call("extraction_progress", path={"job_id": job_id})

    def cancel_extraction(self, job_id: str) -> dict[str, Any]:
        """Stop the job after its batch in flight; its store keeps the committed shards and can be resumed."""
        return self._call("cancel_extraction", path={"job_id": job_id})

    def wait_for_extraction(self, job_id: str, poll_s: float = 1.0, timeout: Optional[float] = None) -> dict[str, Any]:
        """Poll `extraction_progress` until the job is no longer running; answers its last progress.

        `timeout` (seconds) bounds the wait: a job still running then raises TimeoutError naming it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.extraction_progress(job_id)
            if job["state"] != "running":
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"extraction {job_id} is still running after {timeout} s ({job['documents_done']} of "
                                   f"{job['documents_total']} documents); cancel_extraction stops it")
            time.sleep(poll_s)

    def steering_vector(self, layer_name: Union[int, str], positive: Sequence[Union[str, Sequence[int]]],
                        negative: Sequence[Union[str, Sequence[int]]], component: str = "residual", position: str = "mean",
                        format: str = "json") -> dict[str, Any]:
        """Mean activation of `positive` minus that of `negative` at a layer; its `intervention` is ready for `interventions`."""
        return self._call("steering_vector", layer_name=layer_name, positive=[_prompt(p) for p in positive],
                          negative=[_prompt(p) for p in negative], component=component, position=position, format=format,
                          model=self.model)


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
