"""Property (issue 9): after any single edit to a finished cache's manifest, a shard or its rejects
file, either `verify` fails with a typed error naming the cache or file, or the reader returns
exactly the rows of the untouched cache. Deterministic (derandomized); the number of cases tried is
printed (-s); KDCACHE_TAMPER_EXAMPLES=N tries more."""

import copy
import json
import os
import shutil

import numpy as np
import pytest
from .format_helpers import json_paths, make_example, write_cache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats import CacheReader
from formats.errors import KDCacheError
from formats.tools import verify_cache

JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.sampled_from([0, -1, 1, 2**31, 2**53 + 1]),
        st.floats(allow_nan=False),
        st.text(max_size=8),
        st.sampled_from(
            [
                "../x.parquet",
                "/etc/passwd",
                "a/b.parquet",
                "s3://b/x",
                "..",
                "rejects.jsonl",
                "part-00000.parquet",
                "0" * 64,
            ]
        ),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=5,
)


def _edit_manifest(m, data):
    kind = data.draw(st.sampled_from(["set", "delete", "duplicate_shard", "swap_shards", "drop_shard"]), "kind")
    shards = m["shards"]
    if kind == "duplicate_shard":
        shards.insert(data.draw(st.integers(0, len(shards))), copy.deepcopy(data.draw(st.sampled_from(shards))))
        return kind
    if kind == "swap_shards":
        i, j = data.draw(st.integers(0, len(shards) - 1)), data.draw(st.integers(0, len(shards) - 1))
        shards[i], shards[j] = shards[j], shards[i]
        return kind
    if kind == "drop_shard":
        shards.pop(data.draw(st.integers(0, len(shards) - 1)))
        return kind
    path = data.draw(st.sampled_from(sorted((p for p in json_paths(m) if p), key=str)), "path")
    parent = m
    for key in path[:-1]:
        parent = parent[key]
    if kind == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSON_VALUES, "value")
    return f"{kind} {path}"


def _edit_file(path, data):
    raw = bytearray(path.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "append"]), "file edit")
    if kind == "flip" and raw:
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))]
    else:
        raw += b'{"id": "ex0", "reason": "x"}\n' if path.suffix == ".jsonl" else b"\0"
    path.write_bytes(bytes(raw))
    return kind


def _rows(cache):
    """Every row the reader yields, in id order (a list: a row read twice is not the same cache)."""
    return sorted(
        (
            ex.id,
            ex.input_ids.tolist(),
            ex.target_positions.tolist(),
            ex.topk_ids.tolist(),
            np.round(ex.topk_logprobs, 4).tolist(),
            ex.target_ranks.tolist(),
        )
        for ex in CacheReader(cache)
    )


CASES = {
    "single edits": {"tried": 0, "refused": 0, "same rows": 0},
    "rewritten shard cells": {"tried": 0, "refused": 0, "sound rows": 0},
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    rng = np.random.default_rng(9)
    path = tmp_path_factory.mktemp("pristine") / "cache"
    write_cache(
        path, [make_example(rng, i) for i in range(24)], rejects=[("r1", "no assistant turn"), ("r2", "too long: 9")]
    )
    yield _Pristine(path, _rows(path))
    print(f"tamper property: {CASES}")


class _Pristine:
    def __init__(self, path, rows):
        self.path, self.rows = path, rows

    def __repr__(self):
        return f"<pristine cache {self.path}>"


@settings(
    max_examples=int(os.environ.get("KDCACHE_TAMPER_EXAMPLES", 300)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_single_edit_is_refused_or_harmless(pristine, tmp_path_factory, data):
    source, expected = pristine.path, pristine.rows
    cache = tmp_path_factory.mktemp("edit") / "cache"
    shutil.copytree(source, cache)
    target = data.draw(st.sampled_from(["manifest"] * 3 + ["shard", "rejects"]), "target")
    if target == "manifest":
        m = json.loads((cache / "manifest.json").read_text())
        what = _edit_manifest(m, data)
        (cache / "manifest.json").write_text(json.dumps(m))
        names = ["manifest.json", *(p.name for p in cache.iterdir())]  # or the file it now disagrees with
    else:
        files = sorted(p for p in cache.iterdir() if p.suffix == (".parquet" if target == "shard" else ".jsonl"))
        path = data.draw(st.sampled_from(files))
        what = f"{_edit_file(path, data)} {path.name}"
        names = [path.name]
    CASES["single edits"]["tried"] += 1
    try:
        verify_cache(cache)
    except KDCacheError as exc:  # typed, and it says where
        CASES["single edits"]["refused"] += 1
        assert any(n in str(exc) for n in names), (what, str(exc))
        return
    assert _rows(cache) == expected, what  # verify passed: the rows are exactly the untouched cache's
    CASES["single edits"]["same rows"] += 1


def _mutate_cell(value, data):
    """A changed version of one cell of a shard (any column type)."""
    if isinstance(value, bytes):
        raw = bytearray(value)
        kind = data.draw(st.sampled_from(["flip", "truncate", "append"]))
        if kind == "flip" and raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            raw = raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))]
        else:
            raw += bytes([data.draw(st.integers(0, 255))])
        return bytes(raw)
    if isinstance(value, list):
        out = list(value)
        kind = data.draw(st.sampled_from(["shift", "drop", "add"]))
        if kind == "shift" and out:
            i = data.draw(st.integers(0, len(out) - 1))
            out[i] += data.draw(st.integers(-3, 3).filter(bool))
        elif kind == "drop" and out:
            out.pop(data.draw(st.integers(0, len(out) - 1)))
        else:
            out.append(data.draw(st.integers(-2, 2000)))
        return out
    if isinstance(value, int):
        return value + data.draw(st.integers(-3, 3).filter(bool))
    return data.draw(st.sampled_from(["ex0", "ex1", "", "x", None]))


@settings(
    max_examples=int(os.environ.get("KDCACHE_TAMPER_EXAMPLES", 300)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_rewritten_shard_cell_is_refused_or_decodes_soundly(pristine, tmp_path_factory, data):
    """With checksums updated (only the deeper checks can catch it): verify refuses with a typed
    error naming the shard, or every example the reader yields is sound."""
    import pyarrow as pa
    from .format_helpers import rewrite_shard

    cache = tmp_path_factory.mktemp("cell") / "cache"
    shutil.copytree(pristine.path, cache)
    m = json.loads((cache / "manifest.json").read_text())
    index = data.draw(st.integers(0, len(m["shards"]) - 1))

    def edit(table):
        name = data.draw(st.sampled_from(table.schema.names), "column")
        field = table.schema.field(name)
        values = table.column(name).to_pylist()
        if data.draw(st.booleans(), "retype the column"):  # the same values under another Arrow type
            other = {pa.string(): pa.large_string(), pa.binary(): pa.large_binary(), pa.int32(): pa.int64()}
            other[pa.list_(pa.int32())] = pa.list_(pa.int64())
            field = pa.field(name, other.get(field.type, pa.string()))
            if field.type == pa.string() and not pa.types.is_string(table.schema.field(name).type):
                values = [None if v is None else str(v) for v in values]
        else:
            row = data.draw(st.integers(0, table.num_rows - 1), "row")
            values[row] = _mutate_cell(values[row], data)
        return table.set_column(table.schema.get_field_index(name), field, pa.array(values, type=field.type))

    try:
        rewrite_shard(cache, index, edit)
    except (pa.ArrowInvalid, OverflowError):  # a value its column cannot hold: no such file can exist
        return
    CASES["rewritten shard cells"]["tried"] += 1
    try:
        verify_cache(cache)
    except KDCacheError as exc:
        CASES["rewritten shard cells"]["refused"] += 1
        assert m["shards"][index]["file"] in str(exc) or str(cache) in str(exc), str(exc)
        return
    for ex in CacheReader(cache):
        assert isinstance(ex.id, str) and ex.id and isinstance(ex.meta, dict)
        L, t = len(ex.input_ids), ex.target_positions
        assert len(t) == len(ex.topk_ids) == len(ex.target_logprobs) and (len(t) == 0 or (t[0] >= 1 and t[-1] < L))
        assert (np.diff(t) > 0).all() and ex.topk_ids.max(initial=0) < 1000
    CASES["rewritten shard cells"]["sound rows"] += 1
