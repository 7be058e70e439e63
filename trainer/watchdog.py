"""Progress watchdog: ends a training process that has made no progress for `timeout_s` seconds.

A collective timeout only catches a rank blocked inside a collective. A rank stuck elsewhere (a deadlocked
loader, a storage call that never returns, a peer that hangs before its collective while this rank waits in
Python) needs this. On expiry the watchdog prints every thread's stack to stderr (for the operator) and exits
the process with status 86; Ray sees a dead worker, tears the group down, and the run restarts from its last
committed checkpoint.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)
EXIT_CODE = 86


class ProgressWatchdog:
    """`beat()` after every unit of progress; `pause()`/`resume()` around phases with their own time limit."""

    def __init__(self, timeout_s: float, *, what: str = "training", on_expire: Callable[[str], None] | None = None,
                 poll_s: float | None = None):
        if timeout_s <= 0:
            raise ValueError(f"watchdog timeout must be > 0 seconds, got {timeout_s}")
        self.timeout_s, self.what = timeout_s, what
        self._on_expire = on_expire or _exit_process
        self._last = time.monotonic()
        self._paused = False
        self._stop = threading.Event()
        self._poll_s = poll_s if poll_s is not None else min(5.0, timeout_s / 4)
        self._thread = threading.Thread(target=self._watch, name="progress-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self.beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            idle = time.monotonic() - self._last
            if not self._paused and idle > self.timeout_s:
                message = (f"no {self.what} progress for {idle:.0f} s (watchdog timeout {self.timeout_s:.0f} s); "
                           f"stacks of every thread follow; ending process {os.getpid()} so the run restarts")
                self._on_expire(message)
                return


def _exit_process(message: str) -> None:
    log.error(message)
    print(f"[watchdog] {message}", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(EXIT_CODE)
