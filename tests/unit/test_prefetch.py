"""data_loaders/prefetch.py: order, bounded look-ahead, error hand-off and clean shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from data_loaders.prefetch import BackgroundIterator


def test_same_items_in_the_same_order():
    assert list(BackgroundIterator(iter(range(100)), depth=3)) == list(range(100))


def test_producer_stays_at_most_depth_items_ahead():
    produced = []

    def source():
        for i in range(50):
            produced.append(i)
            yield i

    it = BackgroundIterator(source(), depth=2)
    assert next(it) == 0
    time.sleep(0.3)
    # One item taken, two queued, one more held by the producer waiting for room.
    assert len(produced) <= 1 + 2 + 1
    it.close()


def test_error_reaches_the_consumer_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise KeyError("corrupt shard xyz")

    it = BackgroundIterator(source(), depth=4)
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(KeyError, match="corrupt shard xyz"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_close_releases_the_source_on_its_thread_and_stops():
    closed_on = []

    def source():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed_on.append(threading.current_thread().name)

    it = BackgroundIterator(source(), depth=2, name="prefetch-test")
    assert next(it) == 0
    it.close()
    assert closed_on == ["prefetch-test"]
    assert not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="prefetch depth must be >= 1"):
        BackgroundIterator(iter([]), depth=0)
