"""Message decoding for the policy server, off its event loop and fair between small and large frames.

Two kinds of work go through the same lanes: parsing a message (msgpack, cheap checks; every step) and converting
its camera frames for the model (alpha dropped, resized to 224; only on steps that infer, serving/observation.py).

A maximal frame (48 MiB: three 1024x1024 RGBA cameras with depth and segmentation) costs ~0.3 s of CPU on a busy
2-core machine to unpack, check and resize; a 224-px evaluator's frame costs ~3 ms. So:
- small frames (<= SMALL_MESSAGE_BYTES) have their own threads and never queue behind a large one;
- large frames are decoded one at a time; while small frames are being served (one in the last
  SMALL_ACTIVE_S), the large lane rests after each frame in proportion to how long it worked, so it uses at most
  `large_share` of the wall time. Its connections are not read meanwhile (the server reads one message ahead per
  connection), which throttles those clients too: without this, four clients sending maximal frames took all of
  the CPU and a 224-px client's p95 step rose ~20x (bench/serve_bench.py). With no small frames around (only
  full-resolution evaluators) the large lane never rests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time

from data_loaders.behavior_facts import NUM_TASKS
from serving.observation import Observation, decode

SMALL_MESSAGE_BYTES = 4 << 20  # measured: a 224x224 observation is 0.58 MiB, a 720/480 one 3.74 MiB
SMALL_ACTIVE_S = 1.0  # an evaluator steps at >= 10 Hz, so a second without a small frame means none is running


class Decoder:
    def __init__(self, *, workers: int, max_image_side: int, large_share: float) -> None:
        if not 0 < large_share <= 1:
            raise ValueError(f"large_share must be in (0, 1], got {large_share}")
        self.max_image_side, self.large_share = max_image_side, large_share
        self._small = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="b1k-decode")
        self._large = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="b1k-decode-large")
        self._large_lock: asyncio.Lock | None = None  # created on the server's loop
        self.large_rest_s = 0.0  # total rest of the large lane (tests, /admin/status)
        self._last_small = float("-inf")

    async def __call__(self, message: bytes) -> Observation | None:
        """The observation in a binary frame, or None for a reset (ProtocolError on bad input)."""
        return await self._run(functools.partial(decode, message, num_tasks=NUM_TASKS,
                                                 max_image_side=self.max_image_side), len(message))

    async def images(self, obs: Observation):
        """The model's (3, 224, 224, 3) images of `obs`, converted off the event loop in its message's lane."""
        return await self._run(lambda: obs.images, obs.nbytes)

    async def _run(self, work, nbytes: int):
        loop = asyncio.get_running_loop()
        if nbytes <= SMALL_MESSAGE_BYTES:
            self._last_small = loop.time()
            return await loop.run_in_executor(self._small, work)
        if self._large_lock is None:
            self._large_lock = asyncio.Lock()
        await self._large_lock.acquire()
        t0 = time.perf_counter()
        try:
            return await loop.run_in_executor(self._large, work)
        finally:
            # The rest is taken after this frame is answered, before the next large frame starts.
            small_active = loop.time() - self._last_small < SMALL_ACTIVE_S
            rest = (time.perf_counter() - t0) * (1 / self.large_share - 1) if small_active else 0.0
            self.large_rest_s += rest
            loop.call_later(rest, self._large_lock.release)

    def shutdown(self) -> None:
        self._small.shutdown(wait=False, cancel_futures=True)
        self._large.shutdown(wait=False, cancel_futures=True)
