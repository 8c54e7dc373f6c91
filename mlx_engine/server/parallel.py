"""Rank 0's server in a model-parallel job (`mlx-engine serve --parallel tensor|pipeline`).

Every rank of the job (mlx.launch, or MLX_RANK and MLX_HOSTFILE) runs the same command; the
command line (server/cli.py) sends ranks > 0 to `follower_main` (distributed/serve.py: no
HTTP server, no port) and gives rank 0 the ordinary server, which this module adapts:

- Every generation runs through a `Leader` (server/jobs.py), so the other ranks run each of
  its forward passes in lockstep. Continuous batching is off: rows joining and leaving a
  batch between steps are not one call the followers can replay. Requests queue and run
  one at a time, in order.
- The job serves the one model it was started with: the other ranks hold only their parts
  of it. Loading or unloading a model is refused (routes/models.py, `refusal`), and so is
  every route that would run the model outside a generation or change it on rank 0 alone
  (`refused`: its forward passes would reach no other rank, and the job would hang in a
  collective the others never join).
- On SIGINT/SIGTERM the server stops as it always does (shutdown.py); then `finish` calls
  `Leader.shutdown`, which ends the followers' loops, and they exit 0.
- A lost rank fails the generation that met it: 503 `rank_lost` naming the rank, or the
  stream's error event (server/jobs.py). Once that response has left, or at most
  `LOST_EXIT_S` later, the server stops and the process exits 1 instead of serving a model
  that can no longer run a forward pass.
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from typing import Any, Callable, Optional

from flask import Flask, Response, request

from ..distributed.serve import Leader
from .errors import APIError
from .state import EXTENSION_KEY, ServerState

log = logging.getLogger("mlx_engine.server")
LOST_EXIT_S = 5.0  # a lost rank: how long the failed response may take to leave before the server stops anyway
_WATCH_S = 0.1

# In a model-parallel job a request may use the model only as a generation: every other
# engine job (an analysis, a steering vector, an extraction, attaching an SAE) would run
# forward passes, or add hook points, on rank 0 alone. So every write is refused unless it
# is known not to be such work: the generation and capture routes, the model routes
# (load and unload answer their own refusal), and removals of what cannot exist here.
# A route added later is refused until it is listed: a 409 is safe, a job hung in a
# collective the other ranks never join is not. Reads (GET) use no model.
ALLOWED_WRITE_BLUEPRINTS = frozenset({"openai", "activations"})
ALLOWED_WRITE_ENDPOINTS = frozenset({"models.load", "models.unload", "saes.detach", "extract.cancel_job"})
_READS = frozenset({"GET", "HEAD", "OPTIONS"})


def refused(endpoint: Optional[str], method: str) -> bool:
    """Whether a model-parallel server refuses this route (see ALLOWED_WRITE_ENDPOINTS)."""
    if method in _READS or endpoint is None:  # None: no route matched (the 404 says so)
        return False
    return endpoint.split(".", 1)[0] not in ALLOWED_WRITE_BLUEPRINTS and endpoint not in ALLOWED_WRITE_ENDPOINTS


def refusal(st: ServerState, what: str) -> APIError:
    """The 409 for work a model-parallel server cannot do, saying why and what to do instead."""
    leader, models = st.leader, st.registry.ids()
    size = leader.group.size() if leader is not None else 1
    return APIError(
        f"{what} is not available on this server: it serves {models[0] if models else 'one model'!r} split over the "
        f"{size} ranks of a model-parallel job (--parallel {st.config.parallel}), and the other ranks hold only "
        "their parts of that model and follow its generations. Chat and text completions, with activations and "
        "interventions, work; for anything else (another model, analyses, extraction, SAEs) run a server of one "
        "process, or start a new job with the model you need.",
        status=409,
        type="invalid_request_error",
        code="model_parallel_server",
    )


def lead(app: Flask, group: Any, stall_timeout_s: float) -> Leader:
    """Make the app (built with config.parallel, its model loaded) rank 0 of the job.

    `stall_timeout_s`: a generation that makes no progress that long has lost a rank
    (distributed/watchdog.py says why a lost rank can hang instead of failing).
    """
    st: ServerState = app.extensions[EXTENSION_KEY]
    leader = st.engine.call(lambda: Leader(group, stall_timeout_s=stall_timeout_s))  # its collectives run on the engine thread
    st.engine.call(leader.wait_for_ranks)  # serve only once every rank holds its part
    st.leader = leader
    app.before_request(partial(_refuse_unsupported, st))
    app.after_request(partial(_stop_after_loss, st))
    threading.Thread(target=_watch, args=(st,), name="mlx-engine-ranks", daemon=True).start()
    log.info(
        "rank 0 of a %d-rank %s-parallel job: generations run on every rank in lockstep, one at a time "
        "(continuous batching off); model loading, analyses, extraction and SAEs are refused",
        group.size(), st.config.parallel,
    )
    return leader


def finish(st: ServerState, engine_idle: bool, exit_now: Callable[[int], None]) -> int:
    """After the server stopped: end the followers (they exit 0); this process's exit status.

    `exit_now(status)` ends the process if the shutdown message itself stalls.
    """
    leader = st.leader
    assert leader is not None
    if leader.lost is not None:
        log.error("a rank of the job was lost (%s): exiting with status 1; restart the whole job", leader.lost)
        return 1
    if not engine_idle:
        # The engine thread is still inside a forward pass: a shutdown message now would cross
        # that pass's collectives. The other ranks end when this process does.
        log.warning("the engine thread is still inside a generation: not telling the other ranks to stop")
        return 0
    leader.shutdown(on_stall=lambda exc: exit_now(1))
    if leader.lost is not None:
        log.warning("a rank had already left when the job shut down (%s)", leader.lost)
    else:
        log.info("the other ranks were told to stop")
    return 0


def _refuse_unsupported(st: ServerState) -> None:
    if refused(request.endpoint, request.method):
        raise refusal(st, f"{request.method} {request.path}")


def _stop_if_lost(st: ServerState) -> None:
    leader = st.leader
    if leader is not None and leader.lost is not None and not st.stopping.is_set():
        log.error("a rank of the job was lost (%s): stopping the server", leader.lost)
        st.stopping.set()


def _stop_after_loss(st: ServerState, response: Response) -> Response:
    # Once a response has left (a stream: its last event), a lost rank stops the server.
    response.call_on_close(partial(_stop_if_lost, st))
    return response


def _watch(st: ServerState) -> None:
    """Stop the server at most LOST_EXIT_S after a rank was lost, even if no response closes."""
    while not st.stopping.wait(_WATCH_S):
        leader = st.leader
        if leader is not None and leader.lost is not None:
            if not st.stopping.wait(LOST_EXIT_S):
                _stop_if_lost(st)
            return
