"""read_ahead: items in order, errors where they happen, at most `depth` items ahead, the worker stopped on exit."""

import threading

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
    """At most ``depth`` items queued (+ one in the consumer's hand, one being made) at every moment the worker
    makes one; the worker really runs ahead; leaving early stops it."""
    depth, consumed, ahead = 2, [0], []
    ran_ahead = threading.Event()

    def items():
        for i in range(1000):
            ahead.append(i - consumed[0])  # items made and not yet consumed, as this one is made
            if i == depth:
                ran_ahead.set()
            yield i

    with read_ahead(items(), depth=depth) as it:
        assert next(it) == 0
        assert ran_ahead.wait(600)  # a deadline against a hang only: the worker makes items 1 and 2 meanwhile
        consumed[0] = 1
        for x in it:
            consumed[0] += 1
            if x == 50:
                break
    assert not any(t.name == "read-ahead" for t in threading.enumerate())
    assert max(ahead) <= depth + 2 and len(ahead) < 1000
