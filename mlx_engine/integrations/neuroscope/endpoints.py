"""The HTTP endpoints the NeuroScope clients use, described once.

The Python client, the Smalltalk generator (all three dialects), the JavaScript module's
test and the bridge's documentation are all driven by `ENDPOINTS`, and a test checks it
against the server's own OpenAPI document, so no client can ask for a path, a field or
a response key the server does not have. Field defaults here are the *clients'*
defaults (sent explicitly), chosen for analysis: short, greedy generations.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import quote

from ...wire.fields import REQUIRED_FIELD_NAMES


class _Required:
    """Marks a field that has no default: the caller must supply it."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Field:
    """One request field: its JSON name and type, and what a client sends when not told."""

    name: str
    type: str  # JSON Schema type name: string, integer, number, boolean, array, object
    default: Any = None  # None: left out of the request when not given
    doc: str = ""
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class SmalltalkBinding:
    """How the Smalltalk client exposes an endpoint.

    `selector`'s keywords bind, in order, to the body fields named in `args`; fields not
    bound are sent with their defaults. `short_selectors` are convenience forms binding
    a prefix of `args` (the rest take their defaults).
    """

    selector: str
    args: tuple[str, ...] = ()
    short_selectors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Endpoint:
    """One HTTP operation a client calls."""

    name: str
    method: str
    path: str  # `{model_id}` is filled with the client's current model
    summary: str
    smalltalk: SmalltalkBinding
    body: tuple[Field, ...] = ()
    query: tuple[Field, ...] = ()
    reads: tuple[str, ...] = ()  # top-level response keys the clients read
    streams: bool = False  # `stream: true` turns the response into SSE
    client_method: str = ""  # the Python client's method (default: `name`); the JS client's is its camelCase

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(re.findall(r"{(\w+)}", self.path))

    @property
    def python_method(self) -> str:
        return self.client_method or self.name

    @property
    def js_method(self) -> str:
        head, *rest = self.python_method.split("_")
        return head + "".join(p.capitalize() for p in rest)

    def field(self, name: str) -> Field:
        for f in self.body + self.query:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}")

    def render_path(self, **params: str) -> str:
        return self.path.format(**{k: quote(str(v), safe="") for k, v in params.items()})


MODEL_FIELD = Field("model", "string", doc="A loaded model id; the server's only loaded model if left out.")
PROMPT_DOC = "Text (tokenized without a chat template) or a list of token ids."
HOOK_QUERY = Field("hook", "string", REQUIRED, "A hook id the store holds (listStores names them).")

# Activation stores (read-only), analyses on the client's model, and attached SAEs.
RESEARCH_ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        name="list_stores",
        method="GET",
        path="/v1/stores",
        summary="The activation stores under the server's --store-root: id, status, model, hooks and widths.",
        smalltalk=SmalltalkBinding("listStores"),
        reads=("data",),
    ),
    Endpoint(
        name="store_stats",
        method="GET",
        path="/v1/stores/{store_id}/stats",
        summary="A stored hook's per-neuron statistics (neurons) and the layer's summary.",
        smalltalk=SmalltalkBinding("storeStats:hook:", ("store_id", "hook")),
        query=(HOOK_QUERY,),
        reads=("neurons", "summary"),
    ),
    Endpoint(
        name="top_examples",
        method="GET",
        path="/v1/stores/{store_id}/top_examples",
        summary="A neuron's top-activating examples in Neuronpedia's format (tokens, values, maxValue, maxValueTokenIndex).",
        smalltalk=SmalltalkBinding("topExamples:hook:neuron:k:", ("store_id", "hook", "neuron", "k"), ("topExamples:hook:neuron:",)),
        query=(HOOK_QUERY, Field("neuron", "integer", REQUIRED, "The neuron (column)."),
               Field("k", "integer", 20, "Examples at most."), Field("context", "integer", 8, "Positions each side of the peak.")),
        reads=("examples",),
    ),
    Endpoint(
        name="ngram_neurons",
        method="GET",
        path="/v1/stores/{store_id}/reverse",
        summary="The neurons a token or n-gram activates most, per hook (mean activation and z-score).",
        smalltalk=SmalltalkBinding("ngramNeurons:ngram:", ("store_id", "ngram")),
        query=(Field("ngram", "string", REQUIRED, "Token ids ('#12 #40' or '12,40') or text."),
               Field("hook", "string", None, "One hook (default: every hook)."), Field("k", "integer", 10, "Neurons per hook.")),
        reads=("count", "hooks"),
    ),
    Endpoint(
        name="neuron_ngrams",
        method="GET",
        path="/v1/stores/{store_id}/reverse",
        summary="The n-grams (1..n tokens) with the largest mean activation of a neuron.",
        smalltalk=SmalltalkBinding("neuronNgrams:hook:neuron:", ("store_id", "hook", "neuron")),
        query=(HOOK_QUERY, Field("neuron", "integer", REQUIRED, "The neuron (column)."),
               Field("n", "integer", 3, "Longest n-gram."), Field("k", "integer", 10, "N-grams per length.")),
        reads=("ngrams",),
    ),
    Endpoint(
        name="logit_lens",
        method="POST",
        path="/v1/analysis/logit_lens",
        summary="Every layer's residual read through the final norm and head: top tokens, the next token's rank, KL.",
        smalltalk=SmalltalkBinding("logitLens:topK:", ("prompt", "top_k"), ("logitLens:",)),
        body=(Field("prompt", "string", REQUIRED, PROMPT_DOC), Field("top_k", "integer", 5, "Tokens per layer and position."), MODEL_FIELD),
        reads=("layers", "tokens", "top_strings", "top_probs", "next_rank"),
    ),
    Endpoint(
        name="attribution",
        method="POST",
        path="/v1/analysis/attribution",
        summary="Direct logit attribution of logit(target) - logit(foil) to the embedding, layers and heads.",
        smalltalk=SmalltalkBinding("attribution:target:foil:", ("prompt", "target", "foil"), ("attribution:",)),
        body=(Field("prompt", "string", REQUIRED, PROMPT_DOC), Field("target", "string", None, "A token (default: the top one)."),
              Field("foil", "string", None, "A token (default: the runner-up)."), Field("position", "integer", -1, "The position read."),
              MODEL_FIELD),
        reads=("total", "terms", "target_string", "foil_string"),
    ),
    Endpoint(
        name="head_scores",
        method="POST",
        path="/v1/analysis/heads",
        summary="Per-head induction, duplicate-token, previous-token, entropy (and importance) scores.",
        smalltalk=SmalltalkBinding("headScores:repeatLength:", ("prompt", "repeat_length"), ("headScores:",)),
        body=(Field("prompt", "string", REQUIRED, PROMPT_DOC), Field("repeat_length", "integer", 20, "The repeated sequence's length."),
              Field("importance", "boolean", False, "Also ablate each head on the prompt."), MODEL_FIELD),
        reads=("tables", "ranked"),
    ),
    Endpoint(
        name="patching",
        method="POST",
        path="/v1/analysis/patching",
        summary="Activation patching: the fraction of the clean behaviour each (layer, position) restores.",
        smalltalk=SmalltalkBinding("patchClean:corrupted:", ("clean", "corrupted")),
        body=(Field("clean", "string", REQUIRED, PROMPT_DOC), Field("corrupted", "string", REQUIRED, "As many tokens as clean."),
              Field("component", "string", "residual", "The site patched.", ("residual", "attention", "mlp", "resid_mid", "z")),
              Field("metric", "string", "logit_diff", "What is recovered.", ("logit_diff", "prob")), MODEL_FIELD),
        reads=("fractions", "layers", "columns", "clean_metric", "corrupted_metric"),
    ),
    Endpoint(
        name="attach_sae",
        method="POST",
        path="/v1/models/{model_id}/saes",
        summary="Attach an SAE (a folder under an --sae-root, or a Hub id): its features become a hook point.",
        smalltalk=SmalltalkBinding("attachSae:topK:", ("source", "top_k"), ("attachSae:",)),
        body=(Field("source", "string", REQUIRED, "A folder under an --sae-root or --model-root, or 'owner/name'."),
              Field("top_k", "integer", None, "Capture only the k largest features per position.")),
        reads=("id", "hook_id", "d_sae"),
    ),
    Endpoint(
        name="list_saes",
        method="GET",
        path="/v1/models/{model_id}/saes",
        summary="The SAEs attached to the model.",
        smalltalk=SmalltalkBinding("saes"),
        reads=("data",),
    ),
    Endpoint(
        name="detach_sae",
        method="DELETE",
        path="/v1/models/{model_id}/saes/{sae_id}",
        summary="Detach an SAE by its id.",
        smalltalk=SmalltalkBinding("detachSae:", ("sae_id",)),
        reads=("data",),
    ),
)

# Routes no client calls, each with the reason; a test fails on a route in neither table.
NOT_FOR_CLIENTS: dict[str, str] = {
    "GET /openapi.json": "the description of the API itself",
    "GET /static/{filename}": "Flask's static files",
    "GET /ui/": "the viewer's page",
    "GET /ui/{filename}": "the viewer's files",
    "POST /v1/chat/completions": "OpenAI-compatible: the OpenAI SDKs call it",
    "POST /v1/completions": "OpenAI-compatible: the OpenAI SDKs call it",
    "GET /v1/models/{model_id}": "OpenAI-compatible: the OpenAI SDKs call it",
    "POST /v1/models/unload": "operator action, not part of an analysis session",
    "GET /v1/memory": "operator view of the process's memory",
    "GET /v1/activations/hooks": "clients keep their own list: registerHooks answers it",
    "GET /v1/activations/captures": "whole-capture downloads are safetensors files, read with mlx_engine.wire.files",
    "GET /v1/activations/captures/{capture_id}": "whole-capture downloads are safetensors files, read with mlx_engine.wire.files",
    "DELETE /v1/activations/captures/{capture_id}": "whole-capture downloads are safetensors files, read with mlx_engine.wire.files",
    "POST /v1/steering/vectors": "interventions are passed to generateWithActivations as built elsewhere",
    "POST /v1/extract": "extraction is a long job run from the viewer, the command line or Python",
    "GET /v1/extract": "extraction is a long job run from the viewer, the command line or Python",
    "GET /v1/extract/{job_id}": "extraction is a long job run from the viewer, the command line or Python",
    "DELETE /v1/extract/{job_id}": "extraction is a long job run from the viewer, the command line or Python",
}

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        name="health",
        method="GET",
        path="/health",
        summary="Server liveness, loaded models, engine and capture-store state.",
        smalltalk=SmalltalkBinding("health"),
        reads=("status", "models"),
    ),
    Endpoint(
        name="models",
        method="GET",
        path="/v1/models",
        summary="The loaded models (OpenAI list).",
        smalltalk=SmalltalkBinding("models"),
        reads=("data",),
        client_method="list_models",
    ),
    Endpoint(
        name="load_model",
        method="POST",
        path="/v1/models/load",
        summary="Load a model (a folder under a model root, or a Hub repo id); it becomes the client's model.",
        smalltalk=SmalltalkBinding("loadModel:", ("model",)),
        body=(Field("model", "string", REQUIRED, "A folder under one of the server's model roots, or 'owner/name'."),),
        reads=("id",),
    ),
    Endpoint(
        name="hook_points",
        method="GET",
        path="/v1/models/{model_id}/hook_points",
        summary="Every hook point of the model: layers, components, shapes (with symbols T and S), aliases.",
        smalltalk=SmalltalkBinding("hookPoints"),
        reads=("num_layers", "components", "layers"),
    ),
    Endpoint(
        name="register_hooks",
        method="POST",
        path="/v1/activations/hooks",
        summary="Register hooks that later requests without activation_hooks use.",
        smalltalk=SmalltalkBinding("registerHooks:", ("hooks",)),
        body=(
            Field("hooks", "array", REQUIRED, "Hook specs ({layer_name, component, ...}) or hook names."),
            MODEL_FIELD,
        ),
        reads=("data",),
    ),
    Endpoint(
        name="clear_hooks",
        method="DELETE",
        path="/v1/activations/hooks",
        summary="Remove every registered hook of the model.",
        smalltalk=SmalltalkBinding("clearHooks"),
        query=(MODEL_FIELD,),
        reads=("data",),
    ),
    Endpoint(
        name="generate_with_activations",
        method="POST",
        path="/v1/chat/completions/with_activations",
        summary="A chat completion that also returns the activations of the named hooks.",
        smalltalk=SmalltalkBinding(
            "generateWithActivations:hooks:maxTokens:temperature:",
            ("messages", "activation_hooks", "max_tokens", "temperature"),
            ("generateWithActivations:hooks:",),
        ),
        body=(
            Field("messages", "array", REQUIRED, "Chat messages [{role, content}]; a bare string is one user turn."),
            Field("activation_hooks", "array", REQUIRED, "Hook specs or names to capture."),
            Field("max_tokens", "integer", 32, "Tokens to generate at most."),
            Field("temperature", "number", 0.0, "0 is greedy: the same prompt gives the same activations."),
            Field("activation_format", "string", "json", "How captures travel.", ("json", "base64", "none")),
            Field("stream", "boolean", False, "Server-Sent Events, one chunk per generated token."),
            Field("interventions", "array", None, "Edits made while generating (steering, ablation, patching)."),
            MODEL_FIELD,
        ),
        reads=(
            "model",
            "choices",
            "activations",
            "prompt_token_ids",
            "prompt_tokens_text",
            "generated_token_ids",
            "generated_tokens_text",
        ),
        streams=True,
    ),
    *RESEARCH_ENDPOINTS,
)

BY_NAME: dict[str, Endpoint] = {e.name: e for e in ENDPOINTS}


def endpoint(name: str) -> Endpoint:
    """The endpoint called `name` (KeyError naming the known ones otherwise)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown endpoint {name!r}; known: {', '.join(BY_NAME)}") from None


def build_body(ep: Endpoint, values: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The JSON body for `ep`: given values, else defaults; fields defaulting to None are left out."""
    if not ep.body:
        if values:
            raise TypeError(f"{ep.name} takes no body fields, got {sorted(values)}")
        return None
    unknown = set(values) - {f.name for f in ep.body}
    if unknown:
        raise TypeError(f"{ep.name} has no field(s) {sorted(unknown)}")
    body: dict[str, Any] = {}
    for f in ep.body:
        value = values.get(f.name, f.default)
        if value is REQUIRED:
            raise TypeError(f"{ep.name} needs {f.name!r}")
        if f.choices and value is not None and value not in f.choices:
            raise ValueError(f"{f.name} must be one of {', '.join(f.choices)}, not {value!r}")
        if value is not None:
            body[f.name] = value
    return body


def endpoints_markdown() -> str:
    """The endpoint table of docs/neuroscope-format.md (a test keeps the doc equal to this)."""
    lines = [
        "| name | method and path | Smalltalk selector | request fields (client default) | response keys read |",
        "|---|---|---|---|---|",
    ]
    for ep in ENDPOINTS:
        fields = []
        for f in ep.body + ep.query:
            where = "" if f in ep.body else " (query)"
            default = "required" if f.required else ("sent once chosen" if f.default is None else json.dumps(f.default))
            fields.append(f"`{f.name}`: {f.type}{where}, {default}")
        selectors = ", ".join(f"`{s}`" for s in (ep.smalltalk.selector, *ep.smalltalk.short_selectors))
        lines.append(
            f"| {ep.name} | `{ep.method} {ep.path}` | {selectors} | {'; '.join(fields) or '-'} "
            f"| {', '.join(f'`{r}`' for r in ep.reads)} |"
        )
    return "\n".join(lines) + "\n"


JS_BEGIN = "// endpoints:begin (generated from endpoints.py by endpoints_js(); do not edit)"
JS_END = "// endpoints:end"


def endpoints_js() -> str:
    """The endpoint table block of js/neuroscope-client.mjs (a test keeps the module equal to this)."""
    table = {
        ep.name: {
            "method": ep.method,
            "path": ep.path,
            "body": {f.name: (None if f.required else f.default) for f in ep.body},
            "query": [f.name for f in ep.query],
            "required": [f.name for f in ep.body if f.required],
        }
        for ep in ENDPOINTS
    }
    fields = json.dumps(list(REQUIRED_FIELD_NAMES))
    rows = ",\n".join(f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in table.items())
    return (
        f"{JS_BEGIN}\nexport const ENDPOINTS = Object.freeze({{\n{rows},\n}});\n"
        f"// The metadata every wire capture carries (wire/fields.py).\nexport const CAPTURE_FIELDS = Object.freeze({fields});\n{JS_END}\n"
    )
