"""The building blocks of the endpoint table: a request field, a Smalltalk binding, an endpoint.

Kept apart from the tables themselves (endpoints.py, endpoints_research.py) so both tables
can share them and the fields several endpoints take (`model`, a prompt, a store's hook).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote


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
