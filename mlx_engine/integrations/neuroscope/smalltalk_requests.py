"""What each generated Smalltalk endpoint method sends, field by field.

One plan serves two readers: the generator turns it into `body at: ... put: ...` lines,
and `smalltalk_request` turns it into the HTTP request those lines build, so a contract
test can send exactly that request to a real server. The Pharo and Squeak clients cannot
run here (no image can be installed); this is how their requests are still checked.
"""

from __future__ import annotations

import re
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
    "documents": ("{arg} asArray", list),
    "positive": ("{arg} asArray", list),
    "negative": ("{arg} asArray", list),
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


def query_plan(ep: Endpoint) -> list[BodyPart]:
    """The query parameters a generated method appends, in order: bound ones as given, others at their
    client default (left out when it is None). An endpoint whose only query field is `model` uses
    `modelQuery` instead (the client's model, when it has one)."""
    bound = set(ep.smalltalk.args)
    return [BodyPart(f.name, "argument") if f.name in bound else BodyPart(f.name, "default", f.default)
            for f in ep.query if f.name in bound or f.default is not None]


def model_query_only(ep: Endpoint) -> bool:
    return [f.name for f in ep.query] == ["model"]


def path_expression(ep: Endpoint, bound: dict[str, str], literal: Callable[[Any], str], string: Callable[[str], str]) -> str:
    """The Smalltalk expression of a request's path: `{model_id}` is the `id` block argument, other
    path parameters and the query values are bound arguments, percent-encoded by `urlEncode:`."""
    pieces = []
    for part in re.split(r"({\w+})", ep.path):
        if part == "{model_id}":
            pieces.append("id")
        elif part.startswith("{"):
            pieces.append(f"(self urlEncode: {bound[part[1:-1]]})")
        elif part:
            pieces.append(string(part))
    if model_query_only(ep):
        pieces.append("self modelQuery")
    elif ep.query:
        pairs = [f"{string(q.field)} -> {bound[q.field] if q.source == 'argument' else literal(q.value)}" for q in query_plan(ep)]
        pieces.append("(self query: { " + ". ".join(pairs) + " })")
    return " , ".join(pieces)


# The helpers the query building needs, the same source in every dialect. Percent-encoding is
# UTF-8, computed by arithmetic from each character's code (`asciiValue`: the code point in Pharo
# and Squeak, the UTF-16 code unit in Amber, whose surrogate pairs are joined first), so it needs
# no dialect's own encoder; `//`, `\\`, `copyFrom:to:` and brace arrays exist in all three.
QUERY_METHODS: tuple[tuple[str, str], ...] = (
    ("private", """
urlEncode: aValue
    "aValue (a string or a number) percent-encoded for a path segment or a query value: unreserved ASCII
    as it is, every other character as the %XX of each of its UTF-8 bytes, which the server decodes."
    | text safe out i |
    text := aValue isString ifTrue: [ aValue ] ifFalse: [ aValue printString ].
    safe := 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~'.
    out := ''.
    i := 1.
    [ i <= text size ] whileTrue: [
        | code |
        (safe includes: (text at: i))
            ifTrue: [ out := out , (text copyFrom: i to: i) ]
            ifFalse: [
                code := (text at: i) asciiValue.
                ((code between: 16rD800 and: 16rDBFF) and: [ i < text size and: [ (text at: i + 1) asciiValue between: 16rDC00 and: 16rDFFF ] ])
                    ifTrue: [
                        code := (code - 16rD800) * 1024 + ((text at: i + 1) asciiValue - 16rDC00) + 16r10000.
                        i := i + 1 ]
                    ifFalse: [ (code between: 16rD800 and: 16rDFFF) ifTrue: [ code := 16rFFFD ] ].
                (self utf8BytesOf: code) do: [ :byte | out := out , (self percentByte: byte) ] ].
        i := i + 1 ].
    ^ out
"""),
    ("private", """
utf8BytesOf: code
    "The UTF-8 bytes of one code point."
    code < 16r80 ifTrue: [ ^ { code } ].
    code < 16r800 ifTrue: [ ^ { 16rC0 + (code // 64). 16r80 + (code \\\\ 64) } ].
    code < 16r10000 ifTrue: [ ^ { 16rE0 + (code // 4096). 16r80 + (code // 64 \\\\ 64). 16r80 + (code \\\\ 64) } ].
    ^ { 16rF0 + (code // 262144). 16r80 + (code // 4096 \\\\ 64). 16r80 + (code // 64 \\\\ 64). 16r80 + (code \\\\ 64) }
"""),
    ("private", """
percentByte: byte
    | hex |
    hex := '0123456789ABCDEF'.
    ^ '%' , (hex copyFrom: byte // 16 + 1 to: byte // 16 + 1) , (hex copyFrom: byte \\\\ 16 + 1 to: byte \\\\ 16 + 1)
"""),
    ("private", """
query: associations
    "'?key=value&...' of the associations whose value is not nil, the client's model added when chosen."
    | out |
    out := ''.
    associations do: [ :each |
        each value isNil ifFalse: [
            out := out , (out isEmpty ifTrue: [ '?' ] ifFalse: [ '&' ]) , each key , '=' , (self urlEncode: each value) ] ].
    ^ out
"""),
    ("extraction", """
waitForExtraction: jobId
    "As waitForExtraction:every: asking once a second."
    ^ self waitForExtraction: jobId every: 1000
"""),
    ("extraction", """
waitForExtraction: jobId every: milliseconds
    "Asks extractionProgress: every milliseconds until the job is no longer running, and answers its last
    progress (state completed, cancelled or failed). In Amber the answer is a Promise and the wait a timer,
    so the image keeps running meanwhile."
    ^ self when: (self extractionProgress: jobId) do: [ :job |
        (job at: 'state') = 'running'
            ifTrue: [ self pause: milliseconds then: [ self waitForExtraction: jobId every: milliseconds ] ]
            ifFalse: [ job ] ]
"""),
)


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
    for name in ep.path_params:
        if name != "model_id":
            path = path.replace("{" + name + "}", url_encode(values[name]))
    if model_query_only(ep):
        if model is not None:
            path += "?model=" + model  # modelQuery: appended as is
    elif ep.query:
        pairs = [(q.field, values[q.field] if q.source == "argument" else q.value) for q in query_plan(ep)]
        given = [f"{k}={url_encode(v)}" for k, v in pairs if v is not None]
        path += ("?" + "&".join(given)) if given else ""
    return SmalltalkRequest(ep.method, path, body)


def url_encode(value: Any) -> str:
    """As the client's `urlEncode:`: unreserved ASCII kept, every other character as the %XX of its UTF-8
    bytes (a lone surrogate, which has none, as U+FFFD's)."""
    text = value if isinstance(value, str) else str(value)
    out = []
    for c in text:
        if c.isascii() and (c.isalnum() or c in "-_.~"):
            out.append(c)
        else:
            code = 0xFFFD if 0xD800 <= ord(c) <= 0xDFFF else ord(c)
            out.extend(f"%{b:02X}" for b in chr(code).encode("utf-8"))
    return "".join(out)
