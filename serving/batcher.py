"""Batches inference requests from concurrent connections.

One inference thread runs the model (as a GPU would: one batch at a time). Requests that arrive while it is
busy queue up and go together in the next batch; when the thread is idle, a request waits at most `window_ms`
for requests from other connections, and not at all when it is the only connection that could send one, so a
single evaluator pays no batching delay.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from typing import Callable

from serving.control.session import InferenceRequest, InferenceResult
from serving.policy import ServingPolicy

log = logging.getLogger(__name__)


class InferenceBatcher:
    def __init__(self, *, window_ms: float = 2.0, max_batch: int = 16,
                 expected: Callable[[], int] = lambda: 1) -> None:
        """`expected()`: how many requests could arrive at most right now (the open connections)."""
        if max_batch < 1 or window_ms < 0:
            raise ValueError("max_batch must be >= 1 and window_ms >= 0")
        self.window_s, self.max_batch, self.expected = window_ms / 1e3, max_batch, expected
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="b1k-infer")

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="b1k-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, policy: ServingPolicy, request: InferenceRequest) -> InferenceResult:
        assert self._queue is not None, "start() first"
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((policy, request, fut))
        return await fut

    async def _collect(self) -> list:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        items = [await self._queue.get()]
        deadline = loop.time() + self.window_s
        while len(items) < self.max_batch:
            try:
                items.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0 or len(items) >= self.expected():
                break
            try:
                items.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return items

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            groups: dict[int, list] = {}
            for item in items:
                groups.setdefault(id(item[0]), []).append(item)
            for group in groups.values():
                policy = group[0][0]
                self.batch_sizes[len(group)] += 1
                try:
                    results = await loop.run_in_executor(self._executor, policy.infer, [g[1] for g in group])
                except Exception as e:  # noqa: BLE001 - every waiting connection gets the error
                    log.exception("inference of a batch of %d failed", len(group))
                    for _, _, fut in group:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, _, fut), result in zip(group, results):
                    if not fut.done():  # the connection may have gone away meanwhile
                        fut.set_result(result)
