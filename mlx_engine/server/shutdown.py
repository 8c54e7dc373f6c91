"""Stopping on SIGINT or SIGTERM: streams get their last events, work is cancelled, nothing aborts.

Left to the defaults, Ctrl-C during a stream raised KeyboardInterrupt in the main thread,
waitress closed its listener and the interpreter exited while the daemon engine thread
was still inside MLX: `terminate called without an active exception`, SIGABRT. Instead:

1. The signal only sets the server's `stopping` flag (a handler must not do more).
2. The main loop, which polls waitress's sockets itself, sees the flag and stops accepting.
   Every reader of a job sees it too: an open stream sends a final error event
   (`server_shutting_down`) and `data: [DONE]`, a waiting request gets a 503, and each
   reader cancels its job, which the engine stops at its next token or prefill chunk.
3. The loop keeps serving the sockets until those responses have left (at most the grace
   period, `--shutdown-grace`; a second signal ends the wait), then closes every
   connection, stops waitress's threads and waits for the engine thread to be idle
   (engine.py says why it is left parked rather than joined).

`serve` returns whether the engine thread went idle; only then may the interpreter exit
normally (the command line otherwise ends the process at once, still with status 0).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from waitress import wasyncore
from waitress.server import BaseWSGIServer

from .state import ServerState

log = logging.getLogger("mlx_engine.server")
POLL_S = 0.1  # how soon the loop notices the flag (signals do not wake the poll)
ENGINE_STOP_S = 10.0  # what a running job gets to reach its next token or chunk
THREADS_STOP_S = 2.0


class _Signals:
    """The first signal asks for a shutdown; a second one skips the grace period."""

    def __init__(self, stopping: threading.Event) -> None:
        self.stopping = stopping
        self.hurry = threading.Event()
        self.name = ""

    def __call__(self, signum: int, frame: Any) -> None:
        if self.stopping.is_set():
            self.hurry.set()
            return
        self.name = signal.Signals(signum).name
        self.stopping.set()


@contextmanager
def _handled(signals: _Signals) -> Iterator[None]:
    """Route SIGINT and SIGTERM to `signals` while serving (main thread only).

    A signal the process was started with ignored (a background job under a shell
    ignores SIGINT) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, signals)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _socket_map(server: Any) -> dict[int, Any]:
    return server.map if hasattr(server, "map") else server._map  # MultiSocketServer, or one listener


def _poll(server: Any, socket_map: dict[int, Any]) -> None:
    wasyncore.loop(timeout=POLL_S, map=socket_map, use_poll=server.adj.asyncore_use_poll, count=1)


def _responses_pending(server: Any, socket_map: dict[int, Any]) -> bool:
    """Whether any request is still being served or any answer still waits to be sent."""
    dispatcher = server.task_dispatcher
    if dispatcher.active_count > 0 or dispatcher.queue:
        return True
    return any(getattr(channel, "total_outbufs_len", 0) for channel in list(socket_map.values()))


def run_until_stopped(server: Any, st: ServerState, grace_s: float) -> bool:
    """Serve until SIGINT/SIGTERM (or `st.stopping` set otherwise), then shut down as above."""
    socket_map = _socket_map(server)
    signals = _Signals(st.stopping)
    with _handled(signals):
        while not st.stopping.is_set():
            _poll(server, socket_map)
        log.info("shutting down (%s): ending open streams", signals.name or "requested")
        for channel in list(socket_map.values()):
            if isinstance(channel, BaseWSGIServer):  # the listening sockets: no new connections
                wasyncore.dispatcher.close(channel)
        deadline = time.monotonic() + grace_s
        while _responses_pending(server, socket_map) and not signals.hurry.is_set() and time.monotonic() < deadline:
            _poll(server, socket_map)
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=THREADS_STOP_S)
    wasyncore.close_all(socket_map)
    ended = st.engine.quiesce(timeout=ENGINE_STOP_S)
    if not ended:
        log.warning("the engine thread is still inside a job after %.0fs", ENGINE_STOP_S)
    log.info("stopped")
    return ended
