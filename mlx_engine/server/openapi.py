"""The OpenAPI 3.1 document, generated from the routes the app really has.

Each view carries an `Operation` (attached by the `@operation` decorator); the document
walks the app's URL map, so a route cannot exist undocumented or be documented but
absent. Schemas come from the pydantic models that validate requests, so the document
and the validation cannot drift apart. OpenAPI 3.1 uses JSON Schema 2020-12, which is
what pydantic emits, so the schemas go in unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, TypeVar

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__
from .config import ServerConfig
from .schemas.responses import ErrorResponse

F = TypeVar("F", bound=Callable[..., Any])
Mode = Literal["validation", "serialization"]
REF = "#/components/schemas/{model}"
PUBLIC_PATHS = frozenset({"/health", "/openapi.json"})
# The viewer's page and its static files (routes/ui.py): the same for everyone, with no data in
# them, and a browser cannot send a key to load a page; the page asks for it and sends it itself.
PUBLIC_PREFIX = "/ui"
_RULE_PARAM = re.compile(r"<(?:[a-z]+:)?([A-Za-z_]\w*)>")
_ERROR_STATUSES = {
    "400": "Invalid request (malformed JSON, wrong types, unknown hooks, invalid interventions, out-of-range values, "
    "a prompt longer than the context: code context_length_exceeded).",
    "401": "Missing or wrong API key.",
    "403": "A model path outside the configured model roots, or a model folder with links out of them.",
    "404": "Unknown model, hook, capture or route.",
    "405": "Method not allowed on this route.",
    "413": "The request body, or the activations it would capture, exceed the server's limits.",
    "415": "A POST body not sent as application/json.",
    "421": "A Host header that does not name this server (DNS rebinding); see --allowed-host.",
    "500": "Internal error; details are in the server log under the request id.",
    "503": "The server is shutting down.",
}


@dataclass(frozen=True)
class Operation:
    summary: str
    tags: tuple[str, ...]
    request: Optional[type[BaseModel]] = None
    query: Optional[type[BaseModel]] = None
    response: Optional[type[BaseModel]] = None
    stream: Optional[type[BaseModel]] = None  # the chunk model when `stream: true` gives SSE
    binary: Optional[str] = None  # media type of a binary 200 response
    description: str = ""
    path_params: dict[str, str] = field(default_factory=dict)


def is_public(path: str) -> bool:
    """Whether `path` answers without the API key."""
    return path in PUBLIC_PATHS or path == PUBLIC_PREFIX or path.startswith(PUBLIC_PREFIX + "/")


def operation(**kwargs: Any) -> Callable[[F], F]:
    """Attach the OpenAPI description to a view function."""
    op = Operation(**kwargs)

    def mark(view: F) -> F:
        view.openapi = op  # type: ignore[attr-defined]
        return view

    return mark


def openapi_path(rule: str) -> str:
    return _RULE_PARAM.sub(r"{\1}", rule)


def _models(op: Operation) -> list[tuple[type[BaseModel], Mode]]:
    out: list[tuple[type[BaseModel], Mode]] = []
    if op.request is not None:
        out.append((op.request, "validation"))
    if op.query is not None:
        out.append((op.query, "validation"))
    for model in (op.response, op.stream):
        if model is not None:
            out.append((model, "serialization"))
    return out


def _limit_max_tokens(schema: Any, limit: int) -> None:
    """Write the server's max-tokens limit into every max_tokens field's schema."""
    if isinstance(schema, dict):
        props = schema.get("properties", {})
        for name in ("max_tokens", "max_completion_tokens"):
            if name in props:
                for option in props[name].get("anyOf", [props[name]]):
                    if option.get("type") == "integer":
                        option["maximum"] = limit
        for value in schema.values():
            _limit_max_tokens(value, limit)
    elif isinstance(schema, list):
        for value in schema:
            _limit_max_tokens(value, limit)


def _sse_event_schema(chunk_ref: dict[str, str], error_ref: dict[str, str]) -> dict[str, Any]:
    """One Server-Sent Event (OpenAPI before 3.2 has the schema of an event stream describe
    each event): its data is a JSON chunk, an error body if the job fails midway, or [DONE]."""
    return {
        "type": "object",
        "description": "With `stream: true`: one `data: <JSON chunk>` event per step; the stream ends with `data: [DONE]`.",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [chunk_ref, error_ref]},
                    },
                ]
            }
        },
    }


def build_openapi(app: Flask, config: ServerConfig) -> dict[str, Any]:
    ops: list[tuple[str, str, Operation, list[str]]] = []
    for rule in app.url_map.iter_rules():
        op = getattr(app.view_functions.get(rule.endpoint), "openapi", None)
        if op is None:
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            ops.append((openapi_path(rule.rule), method.lower(), op, list(rule.arguments)))

    wanted: dict[tuple[type[BaseModel], Mode], None] = {(ErrorResponse, "serialization"): None}
    for _, _, op, _ in ops:
        for item in _models(op):
            wanted[item] = None
    refs, top = models_json_schema(list(wanted), ref_template=REF)
    components = top.get("$defs", {})
    _limit_max_tokens(components, config.max_tokens_limit)

    error_ref = refs[(ErrorResponse, "serialization")]
    paths: dict[str, dict[str, Any]] = {}
    for path, method, op, args in sorted(ops, key=lambda o: (o[0], o[1])):
        entry: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{method}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}",
            "tags": list(op.tags),
            "responses": {},
        }
        if op.description:
            entry["description"] = op.description
        params = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "description": op.path_params.get(name, ""),
                "schema": {"type": "string", "minLength": 1},
            }
            for name in args
        ]
        if op.query is not None:
            qschema = components[refs[(op.query, "validation")]["$ref"].rsplit("/", 1)[1]]
            for name, prop in qschema.get("properties", {}).items():
                params.append({"name": name, "in": "query", "required": name in qschema.get("required", []), "schema": prop})
        if params:
            entry["parameters"] = params
        if op.request is not None:
            entry["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[(op.request, "validation")]}}}
        ok: dict[str, Any] = {}
        if op.response is not None:
            ok["application/json"] = {"schema": refs[(op.response, "serialization")]}
        if op.stream is not None:
            ok["text/event-stream"] = {"schema": _sse_event_schema(refs[(op.stream, "serialization")], error_ref)}
        if op.binary is not None:
            ok[op.binary] = {"schema": {"type": "string", "contentMediaType": op.binary}}
        entry["responses"]["200"] = {"description": "OK", "content": ok} if ok else {"description": "OK"}
        for status, text in _ERROR_STATUSES.items():
            entry["responses"][status] = {"description": text, "content": {"application/json": {"schema": error_ref}}}
        if path in PUBLIC_PATHS:
            entry["security"] = []
        paths.setdefault(path, {})[method] = entry

    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "mlx-engine",
            "version": __version__,
            "description": "OpenAI-compatible inference with activation capture. Streaming responses are "
            "Server-Sent Events; every error is {\"error\": {message, type, param, code}}.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": components},
    }
    if config.api_key:
        doc["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearerAuth": []}]
    return doc
