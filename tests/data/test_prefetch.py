"""The bounded background prefetcher shared by the cache build and the window loader."""

from __future__ import annotations

import gc
import itertools
import threading
import time

import numpy as np
import pytest

from tsae.data.prefetch import prefetch
from tsae.data.windows import WindowBatches


def alive(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_order_is_the_sources_with_jittered_producer_and_consumer():
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.002, size=(2, 200))

    def source():
        for i in range(200):
            time.sleep(delays[0, i])
            yield i

    got = []
    for i, item in enumerate(prefetch(source(), depth=3, name="pf-order")):
        time.sleep(delays[1, i])
        got.append(item)
    assert got == list(range(200))
    assert not alive("pf-order")


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_the_worker_runs_at_most_depth_items_ahead(depth):
    produced = []

    def source():
        for i in itertools.count():
            produced.append(i)
            yield i

    it = prefetch(source(), depth=depth, name="pf-bound")
    assert next(it) == 0
    time.sleep(0.3)  # let the worker fill the queue and block
    # one consumed, `depth` queued, one held by the blocked worker
    assert len(produced) == depth + 2
    it.close()
    assert not alive("pf-bound")


def test_a_source_exception_reaches_the_consumer_after_the_items_before_it():
    error = ValueError("bad chunk 3")

    def source():
        yield from range(3)
        raise error

    got = []
    with pytest.raises(ValueError) as info:
        for item in prefetch(source(), name="pf-raise"):
            got.append(item)
    assert got == [0, 1, 2]
    assert info.value is error  # the worker's exception object itself
    assert not alive("pf-raise")


def test_stopping_early_closes_the_source_and_joins_the_thread():
    closed = threading.Event()

    def source():
        try:
            yield from itertools.count()
        finally:
            closed.set()

    it = prefetch(source(), depth=2, name="pf-close")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert closed.is_set()  # the source's cleanup ran, on the worker, before close() returned
    assert not alive("pf-close")


def test_dropping_the_iterator_stops_the_worker():
    it = prefetch(itertools.count(), name="pf-drop")
    next(it)
    del it
    gc.collect()
    assert not alive("pf-drop")


def test_an_exception_in_the_consumer_loop_stops_a_worker_busy_in_the_source():
    def slow():
        for i in itertools.count():
            time.sleep(0.05)
            yield i

    def consume():
        for item in prefetch(slow(), name="pf-consumer-fails"):
            if item == 2:
                raise KeyError("consumer failed")

    with pytest.raises(KeyError):
        consume()
    gc.collect()
    assert not alive("pf-consumer-fails")


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        next(prefetch(range(3), depth=0))


def test_window_loader_stopped_after_one_batch_leaves_no_thread():
    acts = np.random.default_rng(0).standard_normal((40, 16, 4)).astype(np.float32)
    loader = WindowBatches(acts, window=4, batch_size=8, chunk_seqs=4, buffer_chunks=2, seed=1)
    full = list(loader)
    it = iter(loader)
    first = next(it)
    it.close()
    assert not alive("WindowBatches")
    assert first.seq.tolist() == full[0].seq.tolist()
    assert first.start.tolist() == full[0].start.tolist()
