"""formats/common/prefetch.py: prefetch yields the iterable's items in order from a named background thread,
at most `size` ahead; the iterable's exceptions re-raise in the consumer after the items before them; a
consumer that stops early stops the thread; nothing runs before the first item is asked for."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from formats.common.prefetch import prefetch


class Source:
    """An endless iterator that counts the items taken from it and the thread that took them."""

    def __init__(self, limit: int | None = None, fail_at: int | None = None, error: BaseException | None = None):
        self.taken, self.threads = 0, set()
        self.limit, self.fail_at, self.error = limit, fail_at, error

    def __iter__(self):
        for i in itertools.count():
            if i == self.limit:
                return
            if i == self.fail_at:
                raise self.error
            self.taken += 1
            self.threads.add(threading.current_thread().name)
            yield i


def settle(source: Source, expected: int) -> int:
    """Wait (up to 2 s) for the producer to take `expected` items, then a little longer: the items taken."""
    deadline = time.monotonic() + 2
    while source.taken < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.15)  # time to run further ahead, were it not bounded
    return source.taken


def test_items_come_in_order_from_the_named_thread():
    source = Source(limit=50)
    assert list(prefetch(source, 4, name="kd-test-prefetch")) == list(range(50))
    assert source.threads == {"kd-test-prefetch"}


@pytest.mark.parametrize("size", [0, 1])
def test_a_size_below_one_still_prefetches_one(size):
    assert list(prefetch(range(5), size)) == [0, 1, 2, 3, 4]


def test_an_empty_iterable_yields_nothing():
    assert list(prefetch([], 2)) == []


def test_nothing_is_read_before_the_first_item_is_asked_for():
    source = Source()
    it = prefetch(source, 3)
    time.sleep(0.05)
    assert source.taken == 0
    assert next(it) == 0
    it.close()


@pytest.mark.parametrize("size", [1, 3])
def test_the_producer_runs_at_most_size_items_ahead(size):
    source = Source()
    it = prefetch(source, size)
    assert next(it) == 0
    # one handed over, `size` queued, one more waiting to be queued
    assert settle(source, 1 + size + 1) == 1 + size + 1
    assert [next(it) for _ in range(3)] == [1, 2, 3]
    assert settle(source, 4 + size + 1) == 4 + size + 1
    it.close()


def test_an_exception_re_raises_in_the_consumer_after_the_items_before_it():
    source = Source(fail_at=3, error=KeyError("shard 7"))
    got = []
    with pytest.raises(KeyError, match="shard 7"):
        for value in prefetch(source, 2):
            got.append(value)
    assert got == [0, 1, 2]


def test_a_base_exception_is_handed_over_too():
    class Stop(BaseException):
        pass

    with pytest.raises(Stop):
        list(prefetch(Source(fail_at=1, error=Stop()), 2))


def test_stopping_early_stops_the_thread():
    source = Source()
    it = prefetch(source, 2, name="kd-test-stop")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # what a `break` out of a for loop does once the generator is dropped
    assert not any(t.name == "kd-test-stop" for t in threading.enumerate())
    taken = source.taken
    time.sleep(0.15)
    assert source.taken == taken <= 3 + 2 + 1  # the endless source is not read any further


def test_a_break_out_of_a_loop_stops_the_thread():
    source = Source()
    for value in prefetch(source, 2, name="kd-test-break"):
        if value == 5:
            break
    deadline = time.monotonic() + 2
    while any(t.name == "kd-test-break" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)  # the generator's finally runs when it is collected
    assert not any(t.name == "kd-test-break" for t in threading.enumerate())


@pytest.mark.xfail(
    strict=True,
    reason="an exception object the iterable yields as an item (not raises) is raised in the consumer: "
    "prefetch tells items from errors by isinstance(value, BaseException)",
)
def test_exception_objects_yielded_as_items_are_items():
    items = [ValueError("an item, not an error"), 1]
    assert list(prefetch(iter(items), 2)) == items
