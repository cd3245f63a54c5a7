"""Run an iterator ahead in a background thread (decoding shards, templating records)."""

from __future__ import annotations

import queue
import threading


def prefetch(iterable, size: int, name: str = "kdcache-prefetch"):
    """Iterate `iterable` in a background thread, up to `size` items ahead; its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=max(1, size))
    end = object()
    stop = threading.Event()

    def put(value) -> bool:
        """Hand `value` over unless the consumer has stopped (a blocking put could then wait forever)."""
        while not stop.is_set():
            try:
                q.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for value in iterable:
                if not put(value):
                    return
            put(end)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            value = q.get()
            if value is end:
                return
            if isinstance(value, BaseException):
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)
