"""Text for clients and for the log: no filesystem paths out, no forged log lines in.

An error message built from an exception can carry the server's own paths (a model root,
the working directory, the Hub cache, a temporary folder): that tells a remote client how
the machine is laid out. `Redactor` rewrites them before a message leaves: a known folder
is cut off, leaving the name within it (a model folder under a root is its model id), and
any other absolute path is cut to its last component (a file's name). The server log keeps
the full text.

`printable` is for the other direction: request paths and bodies are written to the log,
and a `%0a` in a URL decodes to a newline that would start a forged log line.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

# An absolute path that is not one of this API's own routes (messages name those on purpose).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/\\-])/(?!v1/|health\b|openapi\.json\b)[^\s'\"`:,;()\[\]{}<>|/]+(?:/[^\s'\"`:,;()\[\]{}<>|/]+)*/?")
MAX_LOGGED_CHARS = 300


def _folders(roots: Iterable[Path]) -> list[str]:
    """Folders whose names must not reach a client, as written and as resolved, longest first."""
    candidates = [*roots, Path.cwd(), Path.home(), Path(tempfile.gettempdir()), Path(sys.prefix)]
    hub_cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME")
    if hub_cache:
        candidates.append(Path(hub_cache))
    seen: set[str] = set()
    for folder in candidates:
        for form in (folder.expanduser(), folder.expanduser().resolve()):
            text = str(form).rstrip("/")
            if len(text) > 1:
                seen.add(text)
    return sorted(seen, key=len, reverse=True)


class Redactor:
    """Rewrites filesystem paths out of a message meant for a client."""

    def __init__(self, roots: Iterable[Path] = ()) -> None:
        folders = "|".join(re.escape(folder) for folder in _folders(roots))
        self._known = re.compile(rf"(?<![\w.~/\\-])(?:{folders})/")

    def __call__(self, message: str) -> str:
        return _ABSOLUTE_PATH.sub(_last_component, self._known.sub("", message))


def _last_component(match: re.Match[str]) -> str:
    return match.group(0).rstrip("/").rsplit("/", 1)[-1]


def printable(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """`text` on one log line: control and line-breaking characters escaped, length bounded."""
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text) - limit} more characters)"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
