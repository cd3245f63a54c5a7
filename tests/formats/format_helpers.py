"""Factories for the formats tests (`from .format_helpers import ...`; _write_slowly.py, a script, imports it by path)."""

import numpy as np

from formats import CacheWriter, CodecConfig, Example
from formats.codec import tie_canonical


def make_example(rng, i, *, vocab=1000, k=8, min_len=6, max_len=40, prefix="ex", min_targets=1):
    """A random example whose teacher entries come from a real softmax (sorted, distinct ids), with at least
    `min_targets` trained positions (< min_len)."""
    L = int(rng.integers(min_len, max_len))
    input_ids = rng.integers(0, vocab, L).astype(np.int32)
    start = int(rng.integers(1, L - min_targets + 1))
    pos = np.arange(start, L, dtype=np.int32)
    n = len(pos)
    logits = rng.normal(scale=3.0, size=(n, vocab))
    lp = (
        logits
        - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
        - logits.max(1, keepdims=True)
    )
    top = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    actual = input_ids[pos]
    ranks = (lp > lp[np.arange(n), actual][:, None]).sum(1) + 1
    return Example(
        id=f"{prefix}{i}",
        source="unit",
        input_ids=input_ids,
        target_positions=pos,
        topk_ids=top.astype(np.int32),
        topk_logprobs=np.take_along_axis(lp, top, 1).astype(np.float32),
        target_logprobs=lp[np.arange(n), actual].astype(np.float32),
        target_ranks=ranks.astype(np.int32),
    )


PROVENANCE = {
    "teacher": {"name_or_path": "unit-teacher", "dtype": "bfloat16", "engine": "none"},
    "tokenizer": {"name_or_path": "unit", "fingerprint": "abc", "vocab_size": 1000, "chat_template_sha256": "t"},
    "dataset": {"name": "unit", "split": "train"},
    "mode": "score",
}


def write_cache(path, examples, *, k=8, rejects=(), provenance=PROVENANCE, version=2, **kw):
    """A cache of `examples` (several small shards and row groups); version 1 writes the old format."""
    kw.setdefault("row_group_positions", 64)
    kw.setdefault("shard_max_bytes", 4000)
    with CacheWriter(path, codec=CodecConfig(k=k, version=version), provenance=provenance, **kw) as w:
        for ex in examples:
            w.write(ex)
        for rid, reason in rejects:
            w.reject(rid, reason)
    return w.manifest


def json_paths(obj, prefix=()):
    """Every key path of a JSON value (containers and leaves)."""
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from json_paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from json_paths(value, (*prefix, i))


# ---- hostile edits: change one thing and keep every checksum consistent, so that only the check
# under test can catch it ------------------------------------------------------------------------


def edit_manifest(cache, edit):
    """Apply `edit(manifest) -> None` to cache/manifest.json in place."""
    import json
    from pathlib import Path

    path = Path(cache) / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return manifest


def rewrite_shard(cache, index, edit_table=None, edit_metadata=None, **write_options):
    """Rewrite shard `index` of a cache with `edit_table(pa.Table) -> pa.Table` and/or
    `edit_metadata(dict) -> dict` (the shard's kdcache key-value metadata), then update the
    manifest's size and sha256 of that shard, and counts.bytes (the other counts are left as they were)."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    from formats.manifest import sha256_file

    cache = Path(cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    path = cache / manifest["shards"][index]["file"]
    table = pq.read_table(path)
    raw = json.loads(pq.ParquetFile(path).metadata.metadata[b"kdcache"])  # the footer's key (formats.schema)
    if edit_table is not None:
        table = edit_table(table)
    if edit_metadata is not None:
        raw = edit_metadata(raw)
    table = table.replace_schema_metadata({b"kdcache": raw if isinstance(raw, bytes) else json.dumps(raw).encode()})
    pq.write_table(table, path, row_group_size=max(1, table.num_rows), **write_options)
    size = path.stat().st_size
    if "bytes" in manifest.get("counts", {}):
        manifest["counts"]["bytes"] += size - manifest["shards"][index]["bytes"]
    manifest["shards"][index].update(bytes=size, sha256=sha256_file(path))
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def replace_column(table, name, values):
    """`table` with column `name` replaced by the Python list `values` (same type)."""
    import pyarrow as pa

    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, type=table.schema.field(i).type))


def assert_same_topk(got_ids, got_lps, want_ids):
    """The decoded ids equal the written ones up to the order inside ties (groups of equal decoded logprobs)."""
    np.testing.assert_array_equal(tie_canonical(got_ids, got_lps), tie_canonical(want_ids, got_lps))
