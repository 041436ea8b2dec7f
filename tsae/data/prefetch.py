"""Run an iterator on a background thread, a bounded number of items ahead of its consumer.

    for item in prefetch(slow_source(), depth=2, name="reader"):
        ...                      # the source computes the next items meanwhile

Guarantees:

- order: items arrive exactly in the source's order; the source's end or its exception arrives
  after every item it produced before;
- back-pressure: at most `depth` items wait in the queue (plus the one the worker holds);
- errors: an exception raised by the source (any `BaseException`) is re-raised in the consumer,
  the same object, with the worker's traceback;
- stopping: when the consumer stops early (`close()`, `break` then garbage collection, or an
  exception in the consumer's loop), the worker stops at its next hand-over, closes the source
  (so its `finally` / `with` blocks run on the worker thread) and is joined (up to `join_timeout`
  seconds; the thread is a daemon, so a source stuck in a read cannot keep the process alive).

The thread starts at the first `next()`, like any generator body.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_POLL_S = 0.1  # how often a worker blocked on a full queue checks whether the consumer stopped


class _End:
    """The source is exhausted."""


class _Failed:
    """The source raised `error`."""

    def __init__(self, error: BaseException):
        self.error = error


def prefetch(
    source: Iterable[T], depth: int = 2, *, name: str = "prefetch", join_timeout: float = 5.0
) -> Iterator[T]:
    """Yield the items of `source`, produced on a daemon thread up to `depth` items ahead."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    worker = threading.Thread(target=_work, args=(iter(source), q, stop), name=name, daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join(timeout=join_timeout)


def _work(it: Iterator, q: queue.Queue, stop: threading.Event) -> None:
    """The worker: hand each item over until the source ends, fails, or the consumer stops."""

    def put(item) -> bool:  # False: the consumer stopped
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in it:
            if not put(item):
                return
        put(_End())
    except BaseException as e:  # surfaced in the consumer
        put(_Failed(e))
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
