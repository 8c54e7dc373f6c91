"""Noticing a collective that will never return: a rank-0 generation that makes no progress.

MLX's ring backend fails the transfers in flight when a peer goes away ("[ring] connection
to a peer was lost"), but once its socket thread has given up ("Too many send/recv errors"),
a collective started afterwards waits forever: no error, no timeout. A generation runs a
pass ahead (mlx-lm's pipelining), so the pass enqueued ahead can take the failure while the
next flag to the other ranks hangs. Nothing inside the stuck call can end it, so a thread
outside watches: while the leader is inside its own work (a forward pass, a message to the
ranks; not while the caller holds the generator between tokens), each finished step or
message counts as progress, and no progress for `timeout_s` is reported once.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional


class Watchdog:
    """Calls `on_stall(seconds)` once, from its own thread, when busy work makes no progress for `timeout_s`."""

    def __init__(self, timeout_s: float, on_stall: Callable[[float], None]) -> None:
        if timeout_s <= 0:
            raise ValueError(f"the stall timeout must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self._on_stall = on_stall
        self._busy = False
        self._last = time.monotonic()
        self._fired = False
        self._stopped = False
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def busy(self, busy: bool) -> None:
        """Entering (True) or leaving (False) work that must progress; either counts as progress."""
        with self._lock:
            self._busy, self._last = busy, time.monotonic()
            if busy and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlx-engine-rank-watchdog", daemon=True)
                self._thread.start()

    def progress(self) -> None:
        with self._lock:
            self._last = time.monotonic()

    def stop(self) -> None:
        """No more watching (the work is over): the thread ends within a period and never fires."""
        with self._lock:
            self._busy, self._stopped = False, True

    def _run(self) -> None:
        period = min(1.0, self.timeout_s / 10)
        while True:
            time.sleep(period)
            with self._lock:
                if self._stopped:
                    return
                stalled = time.monotonic() - self._last
                fire = self._busy and not self._fired and stalled > self.timeout_s
                self._fired |= fire
            if fire:
                self._on_stall(stalled)
                return
