"""What each generated Smalltalk endpoint method sends, field by field.

One plan serves two readers: the generator turns it into `body at: ... put: ...` lines,
and `smalltalk_request` turns it into the HTTP request those lines build, so a contract
test can send exactly that request to a real server. The Pharo and Squeak clients cannot
run here (no image can be installed); this is how their requests are still checked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

from .endpoints import Endpoint

Source = Literal["argument", "model", "no_stream", "default"]


def _messages_from(value: Any) -> list[Any]:
    """As the client's `messagesFrom:`: a bare string is one user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return list(value)


# How a method argument becomes JSON, by field name: the Smalltalk expression the generator
# writes, and the same conversion on a Python value.
ARGUMENT_CONVERSION: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "messages": ("(self messagesFrom: {arg})", _messages_from),
    "hooks": ("{arg} asArray", list),
    "activation_hooks": ("{arg} asArray", list),
}


@dataclass(frozen=True)
class BodyPart:
    """One body field of a generated method and where its value comes from."""

    field: str
    source: Source
    value: Any = None  # the literal sent, for "no_stream" and "default"


def body_plan(ep: Endpoint) -> list[BodyPart]:
    """The body fields a generated method puts in its request, in order.

    Arguments of the selector are sent as given; `model` is the client's chosen model when
    it has one; `stream` is always false (the Smalltalk clients take whole responses, the
    Python and JS clients stream); other fields go with their client default, and fields
    without a default are left out.
    """
    bound = set(ep.smalltalk.args)
    parts: list[BodyPart] = []
    for f in ep.body:
        if f.name in bound:
            parts.append(BodyPart(f.name, "argument"))
        elif f.name == "model":
            parts.append(BodyPart(f.name, "model"))
        elif f.name == "stream":
            parts.append(BodyPart(f.name, "no_stream", False))
        elif f.default is not None:
            parts.append(BodyPart(f.name, "default", f.default))
    return parts


@dataclass(frozen=True)
class SmalltalkRequest:
    method: str
    path: str  # with the query string, as the client appends it
    body: Optional[dict[str, Any]]


def selector_arity(ep: Endpoint, selector: str) -> int:
    """How many of the endpoint's bound arguments `selector` takes (short selectors take a prefix)."""
    if selector == ep.smalltalk.selector:
        return len(ep.smalltalk.args)
    if selector in ep.smalltalk.short_selectors:
        return len(selector.split(":")) - 1
    raise KeyError(f"{ep.name} has no Smalltalk selector {selector!r}")


def smalltalk_request(ep: Endpoint, selector: str, arguments: Sequence[Any], model: Optional[str]) -> SmalltalkRequest:
    """The request the generated method `selector` sends with these arguments.

    `model` is the client's current model (nil in Smalltalk: None). Endpoints whose path
    names the model resolve it first in the client (`currentModel`), so they need one here.
    """
    binding = ep.smalltalk
    n = selector_arity(ep, selector)
    if len(arguments) != n:
        raise TypeError(f"{selector} takes {n} argument(s), got {len(arguments)}")
    values = dict(zip(binding.args, arguments))
    for name in binding.args[n:]:  # a short selector sends the long one with the defaults
        values[name] = ep.field(name).default
    body: Optional[dict[str, Any]] = None
    if ep.body:
        body = {}
        for part in body_plan(ep):
            if part.source == "argument":
                convert = ARGUMENT_CONVERSION.get(part.field, ("", lambda v: v))[1]
                body[part.field] = convert(values[part.field])
            elif part.source == "model":
                if model is not None:
                    body["model"] = model
            else:
                body[part.field] = part.value
    path = ep.path
    if "{model_id}" in path:
        if model is None:
            raise ValueError(f"{selector} first asks the server for a model (currentModel); give the model it finds")
        path = path.replace("{model_id}", model)  # joined as is, like the generated `, id ,`
    if ep.query and model is not None:
        path += "?model=" + model  # modelQuery: appended as is
    return SmalltalkRequest(ep.method, path, body)
