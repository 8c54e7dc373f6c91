"""The HTTP endpoints the NeuroScope clients use, described once.

The Python client, the Smalltalk generator (all three dialects), the JavaScript module's
test and the bridge's documentation are all driven by `ENDPOINTS`, and a test checks it
against the server's own OpenAPI document, so no client can ask for a path, a field or
a response key the server does not have. Field defaults here are the *clients'*
defaults (sent explicitly), chosen for analysis: short, greedy generations. The core
endpoints are here, the research ones (stores, analyses, SAEs, extraction jobs, steering)
in endpoints_research.py, the building blocks in endpoint_types.py; every name a client
imports from this module is still here.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from ...wire.fields import REQUIRED_FIELD_NAMES
from .endpoint_types import HOOK_QUERY, MODEL_FIELD, PROMPT_DOC, REQUIRED, Endpoint, Field, SmalltalkBinding
from .endpoints_research import JOB_ENDPOINTS, RESEARCH_ENDPOINTS, STORE_ANALYSIS_ENDPOINTS

__all__ = [
    "ENDPOINTS", "NOT_FOR_CLIENTS", "REQUIRED", "Endpoint", "Field", "SmalltalkBinding", "HOOK_QUERY", "MODEL_FIELD",
    "PROMPT_DOC", "build_body", "endpoint", "endpoints_js", "endpoints_markdown",
]

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
}

# What chat and text completions with activations share: everything after the prompt, and the answer's fields.
CAPTURE_FIELDS: tuple[Field, ...] = (
    Field("activation_hooks", "array", REQUIRED, "Hook specs or names to capture."),
    Field("max_tokens", "integer", 32, "Tokens to generate at most."),
    Field("temperature", "number", 0.0, "0 is greedy: the same prompt gives the same activations."),
    Field("activation_format", "string", "json", "How captures travel.", ("json", "base64", "none")),
    Field("stream", "boolean", False, "Server-Sent Events, one chunk per generated token."),
    Field("interventions", "array", None, "Edits made while generating (steering, ablation, patching)."),
    MODEL_FIELD,
)
CAPTURE_READS = ("model", "choices", "activations", "prompt_token_ids", "prompt_tokens_text", "generated_token_ids",
                 "generated_tokens_text")

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
            *CAPTURE_FIELDS,
        ),
        reads=CAPTURE_READS,
        streams=True,
    ),
    Endpoint(
        name="complete_with_activations",
        method="POST",
        path="/v1/completions/with_activations",
        summary="A text completion of a raw prompt (no chat template) that also returns the activations of the named hooks.",
        smalltalk=SmalltalkBinding(
            "completeWithActivations:hooks:maxTokens:temperature:",
            ("prompt", "activation_hooks", "max_tokens", "temperature"),
            ("completeWithActivations:hooks:",),
        ),
        body=(
            Field("prompt", "string", REQUIRED, PROMPT_DOC),
            *CAPTURE_FIELDS,
        ),
        reads=CAPTURE_READS,
        streams=True,
    ),
    *RESEARCH_ENDPOINTS,
    *STORE_ANALYSIS_ENDPOINTS,
    *JOB_ENDPOINTS,
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
