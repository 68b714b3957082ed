"""Producing the items of an iterator in a background thread, a bounded number ahead of the consumer.

``convert`` reads and dequantizes the next part of the source (disk reads, FP8 scaling) while the
current one is being quantized, instead of leaving the disk idle during quantization and the
quantizer idle during reads.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Iterable, Iterator, TypeVar

Item = TypeVar("Item")

_DONE = object()


@contextlib.contextmanager
def read_ahead(items: Iterable[Item], depth: int = 1) -> Iterator[Iterator[Item]]:
    """The items of ``items``, produced by a worker thread at most ``depth`` items ahead.

    An exception raised while producing is raised to the consumer at that point of the stream.
    Leaving the ``with`` block (normally, on an error or on Ctrl-C) stops the worker after the item it
    is making.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put((_DONE, e))
            return
        put((_DONE, None))

    def consume() -> Iterator[Item]:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item

    worker = threading.Thread(target=produce, name="read-ahead", daemon=True)
    worker.start()
    try:
        yield consume()
    finally:
        stop.set()
        worker.join()
