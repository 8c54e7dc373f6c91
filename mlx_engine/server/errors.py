"""Every failure becomes the OpenAI error body `{"error": {message, type, param, code}}`.

One function maps any exception to a status and a body, and one Flask handler uses it,
so a route never formats an error itself and a bug never shows a traceback to a
client: the traceback goes to the server log under the request id. Every message passes
through a redactor on its way out (no filesystem path reaches a client; the log keeps
the full text) and is cut to a bounded length (a message may quote a client's input).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from flask import Flask, Response, g, has_app_context, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from ..hooks.budget import CaptureBudgetError
from ..hooks.names import HookSpecError
from ..interventions.spec import InterventionError
from ..loading import ModelLoadError
from .engine import EngineStopped
from .redact import Redactor, printable
from .schemas.hooks_and_edits import ARRAY_TAGS, HOOK_NAME_TAG, HOOK_SPEC_TAG, POSITION_TAGS

_UNION_TAGS = {HOOK_NAME_TAG, HOOK_SPEC_TAG, *ARRAY_TAGS, *POSITION_TAGS}
INVALID_INTERVENTION = "invalid_intervention"
MAX_MESSAGE_CHARS = 4000
Redact = Callable[[str], str]
_DEFAULT_REDACT = Redactor()

log = logging.getLogger("mlx_engine.server")


class APIError(Exception):
    """An error the client caused or should know about, with its HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code


class ModelNotFound(APIError):
    def __init__(self, model: str, loaded: list[str], param: Optional[str] = "model") -> None:
        super().__init__(
            f"The model {model!r} is not loaded; loaded models: {loaded or 'none'}. "
            "Load it with POST /v1/models/load.",
            status=404,
            type="not_found_error",
            param=param,
            code="model_not_found",
        )


class ServerShuttingDown(APIError):
    """The server got SIGINT or SIGTERM: in-flight work is cancelled, new work refused."""

    def __init__(self) -> None:
        super().__init__(
            "The server is shutting down; this request was cancelled. Retry once it is back.",
            status=503,
            type="server_error",
            code="server_shutting_down",
        )


def is_shutdown(exc: BaseException) -> bool:
    return isinstance(exc, (ServerShuttingDown, EngineStopped))


def error_body(message: str, type: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_field(part: Any) -> bool:
    """Whether a pydantic error-location part names a field (or index) of the request.

    Unions add the label of the member that failed (`str`, `constrained-str`,
    `list[int]`, a model class name) to the location; a client needs the field path only.
    """
    if isinstance(part, int):
        return True
    return not (part in _UNION_TAGS or part in _TYPE_LABELS or "[" in part or "-" in part or part[:1].isupper())


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if not _is_field(part):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _validation_error(exc: ValidationError) -> tuple[int, dict[str, Any]]:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    if errors and errors[0]["type"] == "json_invalid":
        return 400, error_body(f"The request body is not valid JSON: {errors[0]['msg']}.", "invalid_request_error", None, "invalid_json")
    parts: list[str] = []
    for e in errors[:5]:
        where = _loc(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        text = f"{where}: {msg}" if where else msg
        if text not in parts:
            parts.append(text)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    param = (_loc(errors[0]["loc"]) or None) if errors else None
    # Every mistake inside an intervention carries one code, however it was found.
    about_interventions = bool(errors) and errors[0]["loc"][:1] == ("interventions",)
    code = INVALID_INTERVENTION if about_interventions else "invalid_value"
    return 400, error_body("Invalid request: " + "; ".join(parts) + more + ".", "invalid_request_error", param, code)


_HTTP_TYPES = {
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


def to_error(exc: BaseException, request_id: Optional[str] = None, redact: Redact = _DEFAULT_REDACT) -> tuple[int, dict[str, Any]]:
    """The status and error body for any exception, its message redacted and bounded.

    `request_id` is needed only outside a request context (inside a running stream);
    `redact` knows the server's model roots (the default knows the usual folders only).
    """
    if request_id is None and has_app_context():
        request_id = g.get("request_id")
    status, body = _classify(exc, request_id)
    error = body["error"]
    original = error["message"]
    # Bounded before redacting, so a message quoting a huge input costs no more than a short one.
    bounded = original if len(original) <= MAX_MESSAGE_CHARS else (
        original[:MAX_MESSAGE_CHARS] + f"... ({len(original) - MAX_MESSAGE_CHARS} more characters)"
    )
    message = redact(bounded)
    if message != bounded or isinstance(exc, ModelLoadError):
        log.warning("request %s: %s", request_id, printable(original, MAX_MESSAGE_CHARS))
    error["message"] = message
    return status, body


def _classify(exc: BaseException, request_id: Optional[str]) -> tuple[int, dict[str, Any]]:
    if is_shutdown(exc):
        exc = exc if isinstance(exc, ServerShuttingDown) else ServerShuttingDown()
    if isinstance(exc, APIError):
        return exc.status, error_body(exc.message, exc.type, exc.param, exc.code)
    if isinstance(exc, ValidationError):
        return _validation_error(exc)
    if isinstance(exc, CaptureBudgetError):
        return 413, error_body(str(exc), "invalid_request_error", "activation_hooks", "capture_budget_exceeded")
    if isinstance(exc, InterventionError):  # before HookSpecError, which it extends
        return 400, error_body(str(exc), "invalid_request_error", exc.param, INVALID_INTERVENTION)
    if isinstance(exc, HookSpecError):
        return 400, error_body(str(exc), "invalid_request_error", exc.param, "invalid_hook")
    if isinstance(exc, ModelLoadError):
        return 400, error_body(str(exc), "invalid_request_error", "model", "model_load_error")
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        type_, code = _HTTP_TYPES.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
        return status, error_body(exc.description or exc.name, type_, None, code)
    log.error("request %s failed", request_id, exc_info=exc)
    return 500, error_body(
        f"Internal server error (request id {request_id}); the details are in the server log.",
        "server_error",
        None,
        "internal_error",
    )


def handle_exception(exc: Exception, redact: Redact = _DEFAULT_REDACT) -> Response:
    status, body = to_error(exc, redact=redact)
    response = jsonify(body)
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="mlx-engine"'
    allowed = getattr(exc, "valid_methods", None) if status == 405 else None
    if allowed:
        response.headers["Allow"] = ", ".join(allowed)
    return response


def register_error_handler(app: Flask, redact: Redact = _DEFAULT_REDACT) -> None:
    """One handler for everything: HTTP errors (404, 405, 413), validation, engine errors, bugs."""
    app.register_error_handler(Exception, lambda exc: handle_exception(exc, redact))
