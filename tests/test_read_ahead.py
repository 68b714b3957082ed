"""read_ahead: items in order, errors where they happen, at most `depth` items ahead, the worker stopped on exit."""

import threading
import time

import pytest

from ggufmoe.pipeline.read_ahead import read_ahead


def test_items_in_order_made_in_another_thread():
    made_in = set()

    def items():
        for i in range(100):
            made_in.add(threading.current_thread().name)
            yield i

    with read_ahead(items()) as it:
        assert list(it) == list(range(100))
    assert made_in == {"read-ahead"}


def test_error_raised_to_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("damaged shard")

    got = []
    with pytest.raises(ValueError, match="damaged shard"):
        with read_ahead(items()) as it:
            for x in it:
                got.append(x)
    assert got == [1, 2]


def test_bounded_ahead_and_stopped_on_exit():
    made = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    with read_ahead(items(), depth=2) as it:
        assert next(it) == 0
        time.sleep(0.3)
        # one consumed, two waiting in the queue, one made and waiting to be queued
        assert len(made) <= 4
    assert not any(t.name == "read-ahead" for t in threading.enumerate())
    assert len(made) <= 4
