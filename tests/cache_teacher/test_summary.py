"""cache_teacher.summary: the run's summary takes the finished cache's size from the manifest's counts."""

from __future__ import annotations

from cache_teacher.summary import Summary


def test_cache_size_comes_from_the_manifests_counts():
    """issue 10: the size is what the writer recorded in counts, not guessed from per-shard key names."""
    summary = Summary(out="c")
    summary.record_cache_size({"counts": {"bytes": 12_000, "positions": 3_000, "examples": 7}, "shards": []})
    assert (summary.cache_bytes, summary.cache_positions) == (12_000, 3_000)
    assert "bytes/position 4.0" in summary.report()


def test_a_manifest_without_counts_gives_no_size():
    summary = Summary(out="c")
    summary.record_cache_size({"shards": [{"file": "a.parquet", "size": 5, "num_positions": 2}]})
    assert (summary.cache_bytes, summary.cache_positions) == (0, 0) and "bytes/position" not in summary.report()
