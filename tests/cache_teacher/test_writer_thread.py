"""cache_teacher.writer_thread.WriterThread: the cache writer's calls in one background thread, in
submission order; at most one written batch waiting; a failed call surfaces in the caller's thread.
One test drives a real CacheWriter; the others a writer that records (or blocks, or fails) per call."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cache_teacher.writer_thread import WriterThread
from formats import CacheReader, CacheWriter, CodecConfig
from formats.errors import InputError

from ..formats.format_helpers import PROVENANCE, make_example


class RecordingWriter:
    """Records each call with the thread it ran in; `gate` (an Event) holds the calls on the ids in `hold`
    (until the test opens it, so a call cannot finish before the test's next step); ids in `fail` raise."""

    def __init__(self, hold=(), fail=()):
        self.calls: list[tuple] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.started = threading.Event()
        self.hold, self.fail = set(hold), set(fail)

    def write(self, example):
        self.threads.add(threading.current_thread().name)
        if example in self.hold:
            self.started.set()
            assert self.gate.wait(5), "the test never opened the gate"
        if example in self.fail:
            raise InputError(f"duplicate id {example!r}: every example id must be unique within a cache")
        self.calls.append(("write", example))

    def reject(self, record_id, reason, source):
        self.threads.add(threading.current_thread().name)
        if record_id in self.hold:
            assert self.gate.wait(5), "the test never opened the gate"
        if record_id in self.fail:
            raise OSError(f"no space left writing the reject of {record_id}")
        self.calls.append(("reject", record_id, reason, source))


def test_calls_run_in_submission_order_in_one_background_thread():
    writer = RecordingWriter()
    io = WriterThread(writer)
    io.write_batch(["a", "b"])
    io.reject("r1", "too_long: 9 tokens", "src")
    io.write_batch(["c"])
    io.reject("r2", "unknown_role: narrator", "")
    io.drain()
    assert writer.calls == [
        ("write", "a"),
        ("write", "b"),
        ("reject", "r1", "too_long: 9 tokens", "src"),
        ("write", "c"),
        ("reject", "r2", "unknown_role: narrator", ""),
    ]
    assert len(writer.threads) == 1
    (name,) = writer.threads
    assert name.startswith("kdcache-writer") and name != threading.current_thread().name


def test_write_batch_returns_at_once_but_waits_for_the_previous_batch():
    """The teacher works on batch i + 1 while batch i is written; batch i + 2 waits for batch i."""
    writer = RecordingWriter(hold={"a"})
    io = WriterThread(writer)
    io.write_batch(["a"])  # does not wait for the held write
    assert writer.started.wait(5)
    io.reject("r", "too_long: x", "")  # rejects never wait for a batch
    second = threading.Thread(target=io.write_batch, args=(["b"],))
    second.start()
    second.join(0.3)
    assert second.is_alive() and writer.calls == []  # batch b waits for batch a
    writer.gate.set()
    second.join(5)
    assert not second.is_alive()
    io.drain()
    assert writer.calls == [("write", "a"), ("reject", "r", "too_long: x", ""), ("write", "b")]


def test_a_failed_write_surfaces_in_the_callers_thread_at_a_later_call():
    writer = RecordingWriter(hold={"bad"}, fail={"bad"})
    io = WriterThread(writer)
    io.write_batch(["ok", "bad", "never"])  # returns while "bad" is held
    writer.gate.set()
    with pytest.raises(InputError, match="duplicate id 'bad'"):
        io.write_batch(["next"])  # waits for the failed batch, whose failure it raises
    assert ("write", "never") not in writer.calls  # the batch stopped at its failure


def test_a_failed_reject_surfaces_at_drain_when_nothing_follows():
    writer = RecordingWriter(hold={"r-bad"}, fail={"r-bad"})
    io = WriterThread(writer)
    io.write_batch(["a"])
    io.reject("r-bad", "too_long: x", "")  # returns while the reject is held
    threading.Timer(0.1, writer.gate.set).start()
    with pytest.raises(OSError, match="no space left writing the reject of r-bad"):
        io.drain()
    assert writer.calls == [("write", "a")]


def test_drain_waits_for_every_call_and_leaves_nothing_pending():
    writer = RecordingWriter(hold={"slow"})
    io = WriterThread(writer)
    io.write_batch(["slow", "after"])
    threading.Timer(0.2, writer.gate.set).start()
    io.drain()
    assert writer.calls == [("write", "slow"), ("write", "after")] and io.futures == []


def test_a_real_cache_written_through_the_thread_reads_back_in_order(tmp_path):
    rng = np.random.default_rng(0)
    examples = [make_example(rng, i) for i in range(7)]
    with CacheWriter(tmp_path / "c", codec=CodecConfig(k=8), provenance=PROVENANCE, row_group_positions=64) as w:
        io = WriterThread(w)
        io.write_batch(examples[:3])
        io.reject("rej-1", "too_long: 5000 tokens", "unit")
        io.write_batch(examples[3:])
        io.drain()
    read = list(CacheReader(tmp_path / "c"))
    assert [ex.id for ex in read] == [ex.id for ex in examples]
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(read, examples))
    assert w.manifest["counts"]["examples"] == 7 and w.manifest["counts"]["rejects"] == 1
