"""Serving a model-parallel model from rank 0: the other ranks follow its forward passes in lockstep.

Every forward pass of a tensor- or pipeline-parallel model is a collective: all ranks must
run the same passes, in the same order, with the same inputs. Rank 0 serves (HTTP, engine
thread, request parsing) and runs each generation through a `Leader`, which broadcasts the
generation's arguments to the other ranks before starting it; each other rank runs `follow`,
which makes the same call on its own part of the model and steps it when rank 0 does.

The loop asks questions that only rank 0 can answer (is the client still there? should the
prefill stop?). Rank 0 broadcasts each answer as it gives it, one int32 all_sum, so every
rank stops at the same step: a client that disconnects stops every rank, and so does a
server shutting down (`Leader.shutdown` ends the followers' loops). A rank that dies makes
the next collective on the others fail; rank 0 turns that into `RankLostError` (its message
names the cause), refuses further work, and the server can exit instead of hanging. A
collective that never returns (the ring backend's way with a frozen peer, and with a call
started after it gave up on a dead one) is caught by a watchdog (watchdog.py): a generation
without progress for `stall_timeout_s` is the same loss, reported through `on_stall`.
`follower_main` and `Leader.wait_for_ranks` meet once at startup, so rank 0 serves only when
every rank holds its part.

Messages are pickled Python objects (token ids, resolved hooks, bound interventions and
their arrays, sampling arguments): the channel joins only the processes of one job, which
the user started together. With a group of one, `Leader.generate` is exactly
`create_generator_with_activations`.
"""

from __future__ import annotations

import logging
import pickle
import secrets
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..generation.api import create_generator_with_activations
from .watchdog import Watchdog

log = logging.getLogger(__name__)

STOP, CONTINUE = 0, 1
# What MLX's backends say when a peer went away ("[ring] connection to a peer was lost").
_BACKEND_TAGS = ("[ring]", "[jaccl]", "[mpi]", "[nccl]")


class RankLostError(RuntimeError):
    """A rank of the job stopped answering; the model can no longer run a forward pass."""


def _is_backend_failure(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and str(exc).startswith(_BACKEND_TAGS)


class _Channel:
    """Rank 0's words to every rank: int flags and byte messages, each one all_sum."""

    def __init__(self, group: Any, on_progress: Optional[Callable[[], None]] = None) -> None:
        self.group = group
        self.rank = group.rank()
        self._on_progress = on_progress

    def flag(self, value: Optional[int]) -> int:
        """Rank 0 passes `value`; every rank gets it."""
        mine = mx.array([int(value) if self.rank == 0 and value is not None else 0], dtype=mx.int32)
        got = int(mx.distributed.all_sum(mine, group=self.group).item())
        if self._on_progress is not None:
            self._on_progress()
        return got

    def count(self) -> int:
        """Every rank adds 1: the ranks that reached this point (all of them, or the call fails)."""
        return int(mx.distributed.all_sum(mx.array([1], dtype=mx.int32), group=self.group).item())

    def message(self, obj: Any = None) -> Any:
        """Rank 0 passes `obj`; every rank gets a copy."""
        data = pickle.dumps(obj) if self.rank == 0 else b""
        size = self.flag(len(data))
        mine = np.frombuffer(data, dtype=np.uint8) if self.rank == 0 else np.zeros(size, dtype=np.uint8)
        out = mx.distributed.all_sum(mx.array(mine), group=self.group)
        mx.eval(out)  # on rank 0 too: a collective runs only when evaluated
        if self._on_progress is not None:
            self._on_progress()
        return obj if self.rank == 0 else pickle.loads(np.asarray(out).tobytes())


class Leader:
    """Rank 0's side: every generation it runs, the other ranks run too (see the module doc)."""

    def __init__(self, group: Optional[Any] = None, stall_timeout_s: Optional[float] = None) -> None:
        """`stall_timeout_s`: declare the job lost when a generation makes no progress that long (watchdog.py)."""
        self.group = group if group is not None else mx.distributed.init()
        if self.group.rank() != 0:
            raise RuntimeError(f"Leader runs on rank 0; this is rank {self.group.rank()}: run `follow` here.")
        self._watchdog = Watchdog(stall_timeout_s, self._stalled) if stall_timeout_s and self.group.size() > 1 else None
        self._channel = _Channel(self.group, self._watchdog.progress if self._watchdog else None)
        self._on_stall: Optional[Callable[[RankLostError], None]] = None
        self.lost: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.group.size() > 1

    def _check(self) -> None:
        if self.lost is not None:
            raise RankLostError(f"the model-parallel job lost a rank earlier ({self.lost}); restart the job.")

    def _peers(self) -> str:
        """Which rank went away, as far as rank 0 can tell (a ring backend does not say which)."""
        size = self.group.size()
        return "rank 1" if size == 2 else f"one of ranks 1-{size - 1}"

    def _lost(self, exc: BaseException) -> RankLostError:
        self.lost = f"{self._peers()}: {exc}"
        return RankLostError(
            f"{self._peers()} of the {self.group.size()}-rank job stopped answering ({exc}); "
            "the model cannot run without it: restart the job (mlx.launch) after checking that rank's log."
        )

    def _busy(self, busy: bool) -> None:
        if self._watchdog is not None:
            self._watchdog.busy(busy)

    def _stalled(self, seconds: float) -> None:
        """The watchdog's report (its own thread; the stuck call never returns): fail the job."""
        exc = self._lost(RuntimeError(f"no answer for {seconds:.0f} s, in a collective that cannot return"))
        log.error("%s", exc)
        if self._on_stall is not None:
            self._on_stall(exc)

    def wait_for_ranks(self) -> None:
        """Return once every rank holds its part of the model (`follower_main` counts in); RankLostError if one is gone."""
        if not self.distributed:
            return
        try:
            self._channel.count()
        except RuntimeError as exc:
            if _is_backend_failure(exc):
                raise self._lost(exc) from exc
            raise

    def generate(
        self,
        kit: Any,
        prompt_tokens: Sequence[int],
        activation_hooks: Any = (),
        *,
        should_stop: Optional[Callable[[], bool]] = None,
        on_stall: Optional[Callable[[RankLostError], None]] = None,
        **kwargs: Any,
    ) -> Iterator[tuple[Any, Any]]:
        """`create_generator_with_activations`, run by every rank; the other ranks step when this one does.

        `on_stall(error)` is called from the watchdog's thread if this generation stops making
        progress (a rank gone without the backend saying so): the caller's thread is stuck.
        """
        if not self.distributed:
            return create_generator_with_activations(kit, prompt_tokens, activation_hooks, should_stop=should_stop, **kwargs)
        self._check()
        self._on_stall = on_stall
        if kwargs.get("seed") is None and kwargs.get("temp", 0.0):
            kwargs["seed"] = secrets.randbits(31)  # every rank samples the same tokens
        tokens, hooks = [int(t) for t in prompt_tokens], list(activation_hooks)
        channel = self._channel

        def ask() -> bool:
            assert should_stop is not None
            return bool(channel.flag(int(bool(should_stop()))))

        # Checked here first (a request rank 0 refuses never reaches the other ranks).
        steps = create_generator_with_activations(kit, tokens, hooks, should_stop=ask if should_stop else None, **kwargs)
        try:
            self._busy(True)
            channel.message(("generate", tokens, hooks, should_stop is not None, kwargs))
        except BaseException as exc:
            self._busy(False)
            steps.close()  # type: ignore[attr-defined]
            if isinstance(exc, RuntimeError) and _is_backend_failure(exc):
                raise self._lost(exc) from exc
            raise
        self._busy(False)  # until the caller asks for the first step
        return self._steps(steps)

    def _steps(self, steps: Iterator[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        channel = self._channel
        finished = False
        try:
            self._busy(True)
            while True:
                channel.flag(CONTINUE)
                try:
                    item = next(steps)
                except StopIteration:
                    finished = True
                    return
                self._busy(False)  # the caller holds the next step as long as it likes
                yield item
                self._busy(True)
        except GeneratorExit:
            raise  # closed early (client gone): `finally` tells the followers
        except RuntimeError as exc:
            finished = True  # the followers saw the same failure, or are gone
            if _is_backend_failure(exc):
                raise self._lost(exc) from exc
            raise
        except BaseException:
            finished = True  # an error of the generation itself: raised on every rank at the same step
            raise
        finally:
            if not finished and self.lost is None:  # the followers stop at this step too
                self._busy(True)
                try:
                    channel.flag(STOP)
                except RuntimeError as exc:
                    if not _is_backend_failure(exc):
                        raise
                    self.lost = str(exc)
            steps.close()  # type: ignore[attr-defined]
            self._busy(False)

    def shutdown(self, on_stall: Optional[Callable[[RankLostError], None]] = None) -> None:
        """End every follower's loop (they return from `follow`); `on_stall` as in `generate`."""
        if self.distributed and self.lost is None:
            self._on_stall = on_stall
            try:
                self._busy(True)
                self._channel.message(("shutdown",))
            except RuntimeError as exc:
                if not _is_backend_failure(exc):
                    raise
                self.lost = str(exc)
            finally:
                self._busy(False)


def follow(kit: Any, group: Optional[Any] = None, on_step: Optional[Callable[[int, Any], None]] = None,
           stall_timeout_s: Optional[float] = None, on_stall: Optional[Callable[[float], None]] = None) -> int:
    """A rank > 0's serving loop: run what rank 0 runs, until it shuts down; returns the calls followed.

    Errors of a generation (the same on every rank, reported by rank 0) end that call here
    and the loop waits for the next; a lost peer ends the loop with RankLostError.
    `on_step(call_number, (result, activations))` sees each step this rank ran (a log, a check).
    With `stall_timeout_s`, a generation that makes no progress that long (rank 0 frozen, or
    gone after this rank's socket thread gave up: a collective that never returns) calls
    `on_stall(seconds)` from a watchdog's thread. Waiting for rank 0's next call is not
    watched: an idle server sends nothing for as long as it has no request.
    """
    group = group if group is not None else mx.distributed.init()
    watchdog = Watchdog(stall_timeout_s, on_stall or (lambda s: None)) if stall_timeout_s and group.size() > 1 else None
    channel = _Channel(group, watchdog.progress if watchdog else None)
    followed = 0
    try:
        while True:
            if watchdog is not None:
                watchdog.busy(False)
            call = channel.message()
            if call[0] == "shutdown":
                return followed
            if watchdog is not None:
                watchdog.busy(True)
            _, tokens, hooks, asks, kwargs = call
            should_stop = (lambda: bool(channel.flag(None))) if asks else None
            followed += 1
            steps = None
            try:
                steps = create_generator_with_activations(kit, tokens, hooks, should_stop=should_stop, **kwargs)
                while channel.flag(None) == CONTINUE:
                    item = next(steps)
                    if on_step is not None:
                        on_step(followed, item)
            except StopIteration:
                pass
            except Exception as exc:
                if _is_backend_failure(exc):
                    raise
                log.debug("rank %d: call %d ended with %s (rank 0 reports it)", group.rank(), followed, exc)
            finally:
                if steps is not None:
                    steps.close()  # type: ignore[attr-defined]
    except RuntimeError as exc:
        if _is_backend_failure(exc):
            raise RankLostError(f"rank {group.rank()}: rank 0 or another rank stopped answering ({exc}).") from exc
        raise
    finally:
        if watchdog is not None:
            watchdog.stop()


def _follower_stalled(rank: int, seconds: float) -> None:
    """The follower's watchdog fired (its thread): the stuck collective never returns, so the process ends here."""
    import os
    import sys

    print(f"error: rank {rank}: a generation made no progress for {seconds:.0f} s (rank 0 or another rank stopped "
          "answering, in a collective that cannot return); restart the whole job", file=sys.stderr, flush=True)
    os._exit(1)


def follower_main(model: str, parallel: str, stall_timeout_s: Optional[float] = None) -> int:
    """What `mlx-engine serve --parallel P` runs on ranks > 0: load this rank's part, follow rank 0, exit.

    Returns the process exit status: 0 after rank 0's shutdown, 1 when a rank was lost
    (the message, naming the cause, goes to stderr; a generation stalled for `stall_timeout_s`
    ends the process with status 1 from the watchdog's thread). SIGINT is ignored here: Ctrl-C in a
    terminal reaches every rank of a local job at once, and rank 0 alone ends the job
    cleanly (its shutdown ends this loop); SIGTERM still ends this process at once.
    """
    import signal
    import sys

    from ..loading import load_model

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    group = mx.distributed.init()
    kit = load_model(model, parallel=parallel)
    try:
        _Channel(group).count()  # rank 0's Leader.wait_for_ranks: this rank holds its part
    except RuntimeError as exc:
        if not _is_backend_failure(exc):
            raise
        print(f"error: rank {group.rank()}: rank 0 is gone before serving ({exc}); its log says why", file=sys.stderr, flush=True)
        return 1
    print(
        f"rank {group.rank()} of {group.size()}: holding its {parallel}-parallel part of {kit.model_id}, "
        "following rank 0 (stop the job from rank 0: its SIGINT or SIGTERM ends every rank)",
        file=sys.stderr,
        flush=True,
    )
    try:
        followed = follow(kit, group, stall_timeout_s=stall_timeout_s, on_stall=lambda s: _follower_stalled(group.rank(), s))
    except RankLostError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"rank {group.rank()}: rank 0 shut the job down after {followed} generations", file=sys.stderr, flush=True)
    return 0
