"""Caches on object stores: a round trip through a real S3-compatible server (moto) on loopback."""

import fsspec

from formats import CacheReader
from formats.tools import verify_cache

from .format_helpers import assert_same_topk


def test_s3_round_trip(s3, cache, examples):
    fs, options = s3
    fs.put(str(cache) + "/", "kd-bucket/caches/run1/", recursive=True)
    url = "s3://kd-bucket/caches/run1"
    assert verify_cache(url, storage_options=options)["examples"] == len(examples)
    got = {ex.id: ex for ex in CacheReader(url, storage_options=options, shuffle=True, seed=1)}
    assert sorted(got) == sorted(e.id for e in examples)
    for ex in examples:
        assert_same_topk(got[ex.id].topk_ids, got[ex.id].topk_logprobs, ex.topk_ids)
    parts = [[e.id for e in CacheReader(url, rank=r, world_size=2, storage_options=options)] for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(got)


def test_memory_filesystem(cache, examples, tmp_path):
    fs = fsspec.filesystem("memory")  # one store per process: a folder of this test's own (seeds rerun it)
    fs.put(str(cache) + "/", f"/{tmp_path.name}/", recursive=True)
    assert len(list(CacheReader(f"memory://{tmp_path.name}"))) == len(examples)


def test_a_store_that_does_not_say_file_sizes(cache, examples, monkeypatch, tmp_path):
    """HTTP servers may send no Content-Length (fsspec's size() is then None): no TypeError, and
    verify still decides by the sha256."""
    from fsspec.implementations.memory import MemoryFileSystem

    from formats.tools import verify_cache

    fs = fsspec.filesystem("memory")
    fs.put(str(cache) + "/", f"/{tmp_path.name}/", recursive=True)  # a folder of this test's own (seeds rerun it)
    monkeypatch.setattr(MemoryFileSystem, "size", lambda self, path: None)
    verify_cache(f"memory://{tmp_path.name}")
    assert len(list(CacheReader(f"memory://{tmp_path.name}"))) == len(examples)
