"""The decode lanes (serving/decoding.py): small frames never wait for a large one, large frames go one at a time,
and while small frames are served the large lane works at most `large_share` of the wall time."""

from __future__ import annotations

import asyncio
import time

import pytest

import serving.decoding as decoding
from serving.decoding import SMALL_MESSAGE_BYTES, Decoder

LARGE, SMALL = b"L" * (SMALL_MESSAGE_BYTES + 1), b"s"
WORK_S = 0.2  # what decoding a large frame costs here


@pytest.fixture(autouse=True)
def slow_large_decode(monkeypatch):
    def decode(message, **_):
        if len(message) > SMALL_MESSAGE_BYTES:
            time.sleep(WORK_S)
        return len(message)

    monkeypatch.setattr(decoding, "decode", decode)


async def _finish_times(decoder: Decoder, messages: list[bytes], *, stagger_s: float = 0.0) -> list[float]:
    t0 = time.perf_counter()

    async def one(i: int, m: bytes) -> float:
        await asyncio.sleep(i * stagger_s)
        assert await decoder(m) == len(m)
        return time.perf_counter() - t0

    return list(await asyncio.gather(*(one(i, m) for i, m in enumerate(messages))))


def test_small_frames_do_not_wait_for_large_ones():
    decoder = Decoder(workers=2, max_image_side=1024, large_share=0.25)
    large_a, large_b, small = asyncio.run(_finish_times(decoder, [LARGE, LARGE, SMALL]))
    decoder.shutdown()
    assert small < WORK_S / 2  # decoded while the large ones were still going
    assert large_a >= WORK_S and large_b >= 2 * WORK_S  # one large frame at a time


def test_large_lane_rests_only_while_small_frames_are_served():
    alone = Decoder(workers=2, max_image_side=1024, large_share=0.25)
    times = asyncio.run(_finish_times(alone, [LARGE, LARGE]))
    alone.shutdown()
    assert max(times) < 3 * WORK_S and alone.large_rest_s == 0.0  # no small traffic: full speed

    shared = Decoder(workers=2, max_image_side=1024, large_share=0.25)
    # A small frame first, then two large ones: after the first large frame the lane rests 3x its work.
    times = asyncio.run(_finish_times(shared, [SMALL, LARGE, LARGE], stagger_s=0.01))
    shared.shutdown()
    assert times[2] >= WORK_S + 3 * WORK_S + WORK_S
    assert shared.large_rest_s >= 3 * WORK_S * 0.95
