"""Reading a job's events on a request thread, and Server-Sent Events framing.

Each event is written to the client the moment the engine hands it over (the WSGI
server flushes every write; see server.py). A departed client is noticed two ways:
waitress reports it through `environ["waitress.client_disconnected"]` (checked between
events and while waiting), and a failed write closes the response iterator. Either
way the job is cancelled and stops within one generation step (or one prefill chunk).
A server shutting down (SIGINT, SIGTERM) ends every reader the same way, with
ServerShuttingDown, which the stream turns into a last error event and `[DONE]`.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Generator
from typing import Any, Callable, Optional

from .engine import END, EventStream
from .errors import APIError, ServerShuttingDown

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_WAIT_S = 0.05

Disconnected = Optional[Callable[[], bool]]
Stopping = Optional[Callable[[], bool]]


class ClientGone(APIError):
    """The client closed the connection; nobody will read this response."""

    def __init__(self) -> None:
        super().__init__("The client closed the connection.", status=499, code="client_closed_request")


def sse_event(payload: Any) -> bytes:
    """One `data: <json>` event. Compact JSON has no raw newlines, so one line is one event."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def read_events(stream: EventStream, disconnected: Disconnected, stopping: Stopping = None) -> Generator[Any, None, None]:
    """The job's events in order; cancels the job if the client leaves, the server stops, or the reader stops."""
    try:
        while True:
            if disconnected is not None and disconnected():
                raise ClientGone()
            if stopping is not None and stopping():
                raise ServerShuttingDown()
            try:
                event = stream.next(timeout=_WAIT_S)
            except queue.Empty:
                continue
            if event is END:
                return
            yield event
    finally:
        stream.cancel()


def started(events: Generator[Any, None, None]) -> Generator[Any, None, None]:
    """Fetch the first event now (raising the job's error here), then hand all events on."""
    try:
        first = next(events)
    except StopIteration:
        raise RuntimeError("The generation ended without an event.") from None

    def replay() -> Generator[Any, None, None]:
        try:
            yield first
            yield from events
        finally:
            events.close()

    return replay()
