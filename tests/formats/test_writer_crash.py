"""Property test of the writer's commit protocol: kill it between any two file operations, resume with a
fresh CacheWriter (as a rerun of the same command does), and the finished cache must hold exactly the
rows and rejects of an uninterrupted run. Then one random edit of a shard's bytes must make verify fail
with a typed error naming the shard.

A "kill" raises a BaseException subclass at the n-th file operation (os.replace, os.fsync, os.unlink,
os.rmdir, Path.write_text, ParquetWriter.write_table/close) and runs no cleanup, as SIGKILL would; an
"error" raises an ordinary exception inside the `with` block, so the writer's __exit__ runs. After a kill
the in-flight temporary files may also be cut short, and a published shard may be damaged (flipped byte,
truncated, deleted) before the resume: the writer must redo it under a name not in use.

`pytest --hypothesis-show-statistics` prints the number of cases tried.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from .format_helpers import PROVENANCE, make_example
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from formats import CacheReader, CacheWriter, CodecConfig
from formats.errors import ChecksumError, FormatError
from formats.tools import verify_cache

K = 4
CRASH_CASES = int(os.environ.get("KDCACHE_CRASH_CASES", 200))


class Killed(BaseException):
    """The process died: nothing after this runs (not `except Exception`, not the writer's __exit__ work)."""


class TeacherError(RuntimeError):
    """An ordinary failure inside the job: the writer's __exit__ runs."""


class FileOps:
    """Counts file operations; raises `exc` at operation number `crash_at` (once)."""

    def __init__(self):
        self.count, self.crash_at, self.exc = 0, None, Killed

    def tick(self, what: str) -> None:
        self.count += 1
        if self.crash_at is not None and self.count >= self.crash_at:
            self.crash_at = None
            raise self.exc(f"crash at file operation {self.count} ({what})")


@contextlib.contextmanager
def counted(ops: FileOps):
    """Route the file operations the writer uses through `ops.tick`."""
    targets = [
        (os, "replace"),
        (os, "fsync"),
        (os, "unlink"),
        (os, "rmdir"),
        (Path, "write_text"),
        (pq.ParquetWriter, "write_table"),
        (pq.ParquetWriter, "close"),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets]

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            ops.tick(name)
            return fn(*args, **kwargs)

        return wrapper

    try:
        for owner, name, fn in originals:
            setattr(owner, name, wrap(name, fn))
        yield ops
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def make_inputs(seed: int, n: int, reject_every: int) -> list[tuple[str, object]]:
    """n examples, with a rejected record before every `reject_every`-th one."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        if i % reject_every == reject_every - 1:
            items.append(("reject", f"bad-{i}"))
        items.append(("example", make_example(rng, i, k=K, min_len=4, max_len=24)))
    return items


def run_job(path: Path, items, layout: dict, *, with_exit: bool = False) -> None:
    """What a (re)run of the same command does: skip the ids already done, write or reject the rest, finish."""
    w = CacheWriter(path, codec=CodecConfig(k=K, hot=16), provenance=PROVENANCE, compression_level=1, **layout)
    with w if with_exit else contextlib.nullcontext():
        for kind, value in items:
            if (value if kind == "reject" else value.id) in w.done_ids:
                continue
            if kind == "reject":
                w.reject(value, f"no_assistant_turn: {value}")
            else:
                w.write(value)
        w.inputs = len(items)
        if not with_exit:
            w.finish()


def rows(path: Path) -> dict:
    return {
        ex.id: (
            ex.source,
            ex.input_ids,
            ex.target_positions,
            ex.topk_ids,
            ex.topk_logprobs,
            ex.target_logprobs,
            ex.target_ranks,
        )
        for ex in CacheReader(path, prefetch=0)
    }


def rejects(path: Path) -> list:
    return sorted(
        json.loads(line)["id"] + " " + json.loads(line)["reason"]
        for line in (path / "rejects.jsonl").read_text().splitlines()
    )


def assert_same_cache(got: Path, want: Path) -> None:
    a, b = rows(got), rows(want)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key][0] == b[key][0]
        for x, y in zip(a[key][1:], b[key][1:]):
            np.testing.assert_array_equal(x, y)
    assert rejects(got) == rejects(want)
    leftovers = [p.name for p in got.iterdir() if p.name.endswith((".tmp", ".tmp2")) or p.name == "_progress"]
    assert not leftovers, leftovers


def cut_short(path: Path, fraction: float) -> None:
    """What a kill can leave of files still being written: a prefix of them."""
    for tmp in [*path.glob("*.tmp"), *path.glob(".*.tmp"), *path.glob("_progress/*.tmp*")]:
        data = tmp.read_bytes()
        tmp.write_bytes(data[: int(len(data) * fraction)])


def damage(shard: Path, how: str, where: float) -> None:
    data = bytearray(shard.read_bytes())
    if how == "delete":
        shard.unlink()
    elif how == "truncate":
        shard.write_bytes(bytes(data[: int(len(data) * where)]))
    elif data:
        data[min(len(data) - 1, int(len(data) * where))] ^= 0x5A
        shard.write_bytes(bytes(data))
    else:  # already cut to nothing
        shard.write_bytes(b"\x5a")


LAYOUTS = st.fixed_dictionaries(
    {"row_group_positions": st.sampled_from([8, 24, 200]), "shard_max_bytes": st.sampled_from([1, 1500, 1 << 20])}
)
CRASH = st.fixed_dictionaries(
    {
        "at": st.floats(0.0, 1.0),  # where in the job, as a fraction of an uninterrupted run's file operations
        "kind": st.sampled_from(["kill", "kill", "error"]),
        "cut_short": st.sampled_from([None, 0.0, 0.5]),  # kills only: in-flight files left with this fraction
        "damage": st.sampled_from([None, None, "flip", "truncate", "delete"]),  # a published shard, before the resume
        "which": st.floats(0.0, 0.99),
        "where": st.floats(0.0, 0.99),  # which shard (0: the first), where in it
    }
)


@pytest.mark.slow
@settings(
    max_examples=CRASH_CASES,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 20),
    reject_every=st.integers(2, 6),
    layout=LAYOUTS,
    crashes=st.lists(CRASH, min_size=1, max_size=3),
    edit=st.tuples(st.sampled_from(["flip", "truncate"]), st.floats(0.0, 0.99), st.floats(0.0, 0.99)),
)
# issue 9 item 6: killed with shards 0..3 published, shard 0 damaged; the redone rows must not replace a kept shard
@example(
    seed=0,
    n=14,
    reject_every=3,
    layout={"row_group_positions": 8, "shard_max_bytes": 1},
    crashes=[{"at": 0.6, "kind": "kill", "cut_short": None, "damage": "flip", "which": 0.0, "where": 0.5}],
    edit=("flip", 0.5, 0.5),
)
def test_crash_anywhere_then_resume_equals_an_uninterrupted_run(seed, n, reject_every, layout, crashes, edit):
    items = make_inputs(seed, n, reject_every)
    with tempfile.TemporaryDirectory() as tmp:
        clean, path = Path(tmp) / "clean", Path(tmp) / "resumed"
        ops = FileOps()
        with counted(ops):
            run_job(clean, items, layout)
        total = ops.count
        for crash in crashes:
            ops = FileOps()
            ops.crash_at = 1 + int(crash["at"] * (total - 1))
            ops.exc = Killed if crash["kind"] == "kill" else TeacherError
            with counted(ops), contextlib.suppress(Killed, TeacherError):
                run_job(path, items, layout, with_exit=crash["kind"] == "error")
            if crash["kind"] == "kill" and crash["cut_short"] is not None:
                cut_short(path, crash["cut_short"])
            shards = sorted(path.glob("*.parquet")) if not (path / "manifest.json").exists() else []
            if crash["damage"] and shards:
                damage(shards[int(crash["which"] * len(shards))], crash["damage"], crash["where"])
        run_job(path, items, layout)  # the rerun that finishes
        verify_cache(path)
        assert_same_cache(path, clean)
        # one edit of a finished shard's bytes: verify must name the shard
        shards = sorted(path.glob("*.parquet"))
        shard = shards[int(edit[1] * len(shards))]
        damage(shard, *edit[::2])
        with pytest.raises((ChecksumError, FormatError), match=shard.name):
            verify_cache(path)
