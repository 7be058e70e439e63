"""Run an iterator in a background thread, a bounded number of items ahead of its consumer.

The training process spends real time per batch on receiving samples from the DataLoader workers (pipe reads,
unpickling) and collating them (measured in bench/README.md: ~8 ms per batch of 4 at 224^2, 3 cameras). Those
calls release the GIL, so a thread can do them while the trainer's forward/backward runs, and `next()` on
the training thread only takes a ready batch off a queue.

torchdata's StatefulDataLoader (which runs the workers, stream.py) has no such thread: its only one is the CUDA
pin-memory thread, and collating inside the workers would make each batch come from one slot. The thread also
lets the loader hand out the StatefulDataLoader state taken after each batch, not after what it prefetched.
"""

from __future__ import annotations

import queue
import threading
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class BackgroundIterator(Generic[T]):
    """Iterates `source` on a daemon thread, at most `depth` items ahead; same items, same order.

    An exception raised by `source` is re-raised by `__next__` in the consumer (with its original traceback)
    after the items produced before it. `close()` stops the thread, waits for it, and closes `source` on that
    thread, so resources the source holds (e.g. DataLoader worker processes) are released before it returns.
    """

    def __init__(self, source: Iterator[T], depth: int, *, name: str = "prefetch"):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failure(exc))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> "BackgroundIterator[T]":
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("the prefetch thread ended without a result") from None
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.exc
        return item

    def close(self) -> None:
        """Stop producing, release the source, and wait for the thread. Idempotent."""
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # absent when __init__ rejected its arguments
        if stop is not None:
            stop.set()
