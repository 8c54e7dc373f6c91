"""What keeps a local API safe from the web pages its user visits.

A server on 127.0.0.1 is reachable from any page in the user's browser. Two rules close
the doors a page could use without the user's consent:

- The Host header must name this server: the bound address or a loopback name, with the
  bound port, or a name the operator allowed (`--allowed-host`). DNS rebinding points a
  page's own name at 127.0.0.1 after it loads; its requests then carry that name as Host,
  and are refused here before any route runs.
- A POST body must be declared `application/json`. Browsers send text/plain and form
  bodies cross-origin without asking (no CORS preflight); a JSON content type makes them
  ask first, and the CORS policy (no origin allowed unless configured) answers no.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Optional

from .errors import APIError
from .redact import printable

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def split_host(header: str) -> Optional[tuple[str, Optional[str]]]:
    """(name, port or None) of a Host header, the name lowercased; None if malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, sep, rest = header[1:].partition("]")
        if not sep or not _is_ip(name) or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] or None
    else:
        name, _, port_text = header.partition(":")
        port = port_text or None
        if ":" in port_text:
            return None
    if port is not None and not port.isdigit():
        return None
    name = name.rstrip(".")
    return (name, port) if name else None


class HostPolicy:
    """Which Host headers a server answers (see the module docstring)."""

    def __init__(self, bound_host: str, allowed: Iterable[str] = ()) -> None:
        bound = bound_host.strip("[]").lower()
        self.any_address = bound in WILDCARD_HOSTS
        self.own_names = LOOPBACK_NAMES | ({bound} if not self.any_address else set())
        self.any_port: set[str] = set()
        self.with_port: set[tuple[str, str]] = set()
        for entry in allowed:
            parsed = split_host(entry)
            if parsed is None:
                raise ValueError(f"--allowed-host {entry!r} is not a host name or name:port")
            name, port = parsed
            if port is None:
                self.any_port.add(name)
            else:
                self.with_port.add((name, port))

    def allows(self, header: Optional[str], server_port: str) -> bool:
        if header is None:
            return True  # HTTP/1.0 without Host: not a browser, so not a rebinding page
        parsed = split_host(header)
        if parsed is None:
            return False
        name, port = parsed
        if name in self.any_port or (port is not None and (name, port) in self.with_port):
            return True
        if name in self.own_names or (self.any_address and _is_ip(name)):
            return (port or "80") == server_port
        return False

    def refusal(self, header: str, server_port: str) -> APIError:
        return APIError(
            f"The Host header {printable(header, 100)!r} does not name this server: it answers to its own "
            f"address, 127.0.0.1, localhost or [::1] with port {server_port}, and to names given with "
            "--allowed-host. (This refuses DNS rebinding, where a web page reaches a local server under a "
            "name it controls.)",
            status=421,
            type="invalid_request_error",
            code="host_not_allowed",
        )


def require_json(method: str, mimetype: str, content_type: Optional[str]) -> None:
    """Refuse a POST whose body is not declared JSON (415)."""
    if method == "POST" and mimetype != "application/json":
        given = printable(content_type, 100) if content_type else "none"
        raise APIError(
            f"A POST body must be JSON sent with 'Content-Type: application/json' (got {given}). Other types "
            "are refused so that a web page cannot post to this server without a CORS preflight.",
            status=415,
            type="invalid_request_error",
            code="unsupported_media_type",
        )
