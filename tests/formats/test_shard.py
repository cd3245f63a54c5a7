"""formats/shard.py: spans, check_example, encode_rows <-> decode_table (values, spans, meta), column_bytes,
check_spans, the row checks decode_table applies with a manifest's limits, and ShardFile on a real cache
(row groups, hashing before parsing, the expansion bound). Whole-cache attacks through verify and the
reader are in test_hostile_cache.py, test_tools.py and the mutation fuzzer."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from formats import codec as C
from formats import shard as S
from formats.errors import ChecksumError, FormatError, InputError
from formats.example import Example
from formats.manifest import load_manifest, open_cache, row_limits
from formats.reader import CacheReader
from formats.schema import read_shard_metadata, shard_metadata
from formats.shard import ShardFile, check_example, check_spans, column_bytes, decode_table, encode_rows, spans

from .format_helpers import edit_manifest, make_example, replace_column, write_cache

CFG = C.CodecConfig(k=4, hot=8)
LIMITS = {
    "mode": "score",
    "max_tokens": 64,
    "finish_reasons": {None},
    "ids": {"topk": (1000, "the output size 1000"), "input": (1000, "1000 (the larger)")},
}


def example(id="a", input_ids=(1, 2, 3, 4, 5, 6), positions=(2, 3, 5), k=4, **kw) -> Example:
    """A small valid example: entries 10, 11, ... at logprobs -0.5, -1.5, ... at each position."""
    n = len(positions)
    ids = (10 + np.arange(n * k).reshape(n, k)).astype(np.int32)
    lps = np.tile(-0.5 - np.arange(k, dtype=np.float32), (n, 1))
    return Example(
        id=id,
        input_ids=np.asarray(input_ids, np.int32),
        target_positions=np.asarray(positions, np.int32),
        topk_ids=ids,
        topk_logprobs=lps,
        target_logprobs=np.full(n, -2.0, np.float32),
        target_ranks=np.full(n, 3, np.int32),
        **kw,
    )


def encode(examples: list[Example], cfg=CFG):
    """The Arrow table of `examples` as the writer makes it, and its metadata as a reader checks it."""
    hot = C.build_hot_table(np.concatenate([ex.topk_ids.ravel() for ex in examples]), cfg.hot)
    meta = shard_metadata(cfg.to_dict(), 2, hot)
    table = encode_rows(examples, cfg, C.IdCodes(hot), 2, meta)
    return table, read_shard_metadata(table.schema, "t")


def decoded(table, limits=LIMITS):
    return decode_table(table, read_shard_metadata(table.schema, "t"), "t", limits)


def refused(table, pattern, limits=LIMITS):
    with pytest.raises(FormatError, match=pattern):
        decoded(table, limits)


# ---- spans ---------------------------------------------------------------------------------


def test_spans_are_the_runs_of_consecutive_positions():
    assert spans(np.array([3, 4, 5, 8, 10, 11])) == ([3, 8, 10], [6, 9, 12])
    assert spans(np.array([7])) == ([7], [8])
    assert spans(np.array([], np.int32)) == ([], [])


# ---- check_example -------------------------------------------------------------------------


def test_a_valid_example_passes_check_example():
    check_example(example())
    check_example(example(positions=()))  # nothing trained: still an example


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(id=""), "id must be a non-empty string"),
        (dict(positions=(0, 1)), r"target positions must lie in 1..5 \(position 0 has no prediction\)"),
        (dict(positions=(2, 6)), "target positions must lie in 1..5"),
        (dict(positions=(3, 3)), "target_positions must be strictly increasing"),
        (dict(positions=(4, 2)), "target_positions must be strictly increasing"),
    ],
)
def test_check_example_refuses_bad_positions_and_ids(change, pattern):
    with pytest.raises(InputError, match=pattern):
        check_example(example(**change))


def test_check_example_refuses_teacher_arrays_of_the_wrong_shape():
    ex = example()
    ex.topk_ids = ex.topk_ids[:2]
    with pytest.raises(InputError, match=r"example 'a': topk_ids has shape \(2, 4\), expected \[3, K\]"):
        check_example(ex)
    ex = example()
    ex.topk_logprobs = ex.topk_logprobs.ravel()
    with pytest.raises(InputError, match=r"topk_logprobs has shape \(12,\)"):
        check_example(ex)
    ex = example()
    ex.target_ranks = ex.target_ranks[:1]
    with pytest.raises(InputError, match="target_ranks has 1 values, expected 3"):
        check_example(ex)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_check_example_refuses_nan_and_positive_infinity_naming_the_position(value):
    ex = example()
    ex.topk_logprobs[1, 2] = value
    with pytest.raises(InputError, match=rf"example 'a', position 3 \(teacher row 1\): topk_logprobs holds {value}"):
        check_example(ex)
    ex = example()
    ex.target_logprobs[2] = value
    with pytest.raises(InputError, match="position 5 .teacher row 2.: target_logprobs holds"):
        check_example(ex)


def test_check_example_allows_minus_infinity_padding():
    ex = example()
    ex.topk_ids[:, 3], ex.topk_logprobs[:, 3] = -1, -np.inf  # a mass-adaptive row keeps 3 entries
    check_example(ex)


# ---- encode_rows <-> decode_table ----------------------------------------------------------


def test_rows_round_trip_with_several_spans_and_quantized_logprobs():
    a = example("a", positions=(1, 2, 4, 5), meta={"messages": [{"role": "user", "content": "hi"}]}, source="s1")
    b = example("b", input_ids=range(20, 29), positions=(8,), finish_reason=None)
    table, meta = encode([a, b])
    assert table.column("target_starts").to_pylist() == [[1, 4], [8]]
    assert table.column("target_ends").to_pylist() == [[3, 6], [9]]
    assert table.column("num_targets").to_pylist() == [4, 1]
    out = decode_table(table, meta, "t", LIMITS)
    assert [e.id for e in out] == ["a", "b"] and [e.source for e in out] == ["s1", ""]
    for got, want in zip(out, (a, b)):
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.target_positions, want.target_positions)
        np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
        np.testing.assert_array_equal(got.target_ranks, want.target_ranks)
        assert np.abs(got.topk_logprobs - want.topk_logprobs).max() < 0.016  # the codec's bound
        assert np.abs(got.target_logprobs - want.target_logprobs).max() <= 1 / 512
    assert out[0].meta == a.meta and out[1].meta == {}


def test_an_empty_meta_is_stored_as_null_and_decoded_as_an_empty_object():
    table, _ = encode([example(meta={})])
    assert table.column("meta").to_pylist() == [None]
    assert decoded(table)[0].meta == {}


def test_the_schema_of_encoded_rows_is_the_shards():
    table, meta = encode([example()])
    assert meta["id_bytes"] == 2 and json.loads(table.schema.metadata[b"kdcache"])["codec"] == CFG.to_dict()
    assert "topk_code_b1" in table.schema.names and "topk_code_b2" not in table.schema.names


def test_a_table_with_no_rows_decodes_to_no_examples():
    table, meta = encode([example()])
    assert decode_table(table.slice(0, 0), meta, "t", LIMITS) == []


def test_decode_table_keeps_the_id_codes_in_the_metadata():
    table, meta = encode([example()])
    decode_table(table, meta, "t")
    codes = meta["_codes"]
    decode_table(table, meta, "t")
    assert meta["_codes"] is codes and isinstance(codes, C.IdCodes)


# ---- column_bytes --------------------------------------------------------------------------


def test_column_bytes_of_a_slice_are_only_its_rows_bytes():
    table = pa.table({"s": pa.array([b"ab", b"", b"cde", b"f"], pa.binary())})
    assert bytes(column_bytes(table, "s")) == b"abcdef"
    assert bytes(column_bytes(table.slice(2, 2), "s")) == b"cdef"
    assert bytes(column_bytes(pa.table({"s": pa.array([b"", b""], pa.binary())}), "s")) == b""


def test_column_bytes_refuses_nulls():
    with pytest.raises(FormatError, match="column s has null values"):
        column_bytes(pa.table({"s": pa.array([b"a", None], pa.binary())}), "s")


# ---- check_spans ---------------------------------------------------------------------------


def span_table(starts, ends, lengths):
    return pa.table(
        {
            "id": [f"r{i}" for i in range(len(starts))],
            "target_starts": pa.array(starts, pa.list_(pa.int32())),
            "target_ends": pa.array(ends, pa.list_(pa.int32())),
        }
    ), np.asarray(lengths)


def test_check_spans_returns_every_rows_positions_in_order():
    table, lengths = span_table([[1, 5], [], [2]], [[3, 7], [], [4]], [8, 3, 4])
    positions = check_spans(table, lengths, np.array([4, 0, 2]), "t")
    assert positions.dtype == np.int32 and positions.tolist() == [1, 2, 5, 6, 2, 3]


def test_check_spans_refuses_starts_and_ends_of_different_lengths():
    table, lengths = span_table([[1], [1, 3]], [[2], [2]], [5, 5])
    with pytest.raises(FormatError, match=r"t, row 1 \(id 'r1'\): target_starts and target_ends have different"):
        check_spans(table, lengths, np.array([1, 1]), "t")


def test_check_spans_refuses_spans_that_do_not_cover_num_targets():
    table, lengths = span_table([[1], [1, 3]], [[2], [2, 5]], [5, 5])
    with pytest.raises(FormatError, match=r"row 1 \(id 'r1'\): target spans cover 3 positions, num_targets says 4"):
        check_spans(table, lengths, np.array([1, 4]), "t")


def test_check_spans_names_the_first_bad_row_and_span():
    table, lengths = span_table([[1], [2, 4]], [[2], [5, 6]], [5, 9])
    with pytest.raises(FormatError, match=r"row 1 \(id 'r1'\): target span \[4, 6\) overlaps the previous span"):
        check_spans(table, lengths, np.array([1, 5]), "t")


# ---- what decode_table checks in each row --------------------------------------------------


def test_rows_longer_than_the_limit_are_refused_naming_the_row():
    table, _ = encode([example("a"), example("long", input_ids=range(1, 70), positions=(60,))])
    refused(table, r"t, row 1 \(id 'long'\): 69 tokens, more than the 64 the manifest's settings allow")
    assert len(decoded(table, {**LIMITS, "max_tokens": None})) == 2


def test_finish_reasons_must_match_the_mode():
    table, _ = encode([example(finish_reason="stop")])
    refused(table, r"row 0 \(id 'a'\): finish_reason 'stop' in a score-mode cache")
    generate = {**LIMITS, "mode": "generate", "finish_reasons": {"stop", "length"}}
    assert decoded(table, generate)[0].finish_reason == "stop"
    refused(encode([example()])[0], "finish_reason None in a generate-mode cache", generate)


def test_teacher_ids_at_or_above_the_output_size_are_refused():
    table, _ = encode([example("a"), example("b")])
    refused(
        table,
        r"row 0 \(id 'a'\): teacher token id 21 >= the output size 20",
        {**LIMITS, "ids": {**LIMITS["ids"], "topk": (20, "the output size 20")}},
    )


def test_input_ids_outside_the_vocabulary_are_refused():
    table, _ = encode([example("a"), example("b", input_ids=(1, 2, 3, 4, 5, 1000))])
    refused(table, r"row 1 \(id 'b'\): input_ids outside 0..1000")
    table, _ = encode([example("a", input_ids=(1, 2, -3, 4, 5, 6))])
    refused(table, r"row 0 \(id 'a'\): input_ids outside 0..")


def test_a_top_k_mass_above_one_is_refused():
    ex = example("b")
    ex.topk_logprobs[1] = 0.0  # four entries of probability 1
    table, _ = encode([example("a"), ex])
    refused(table, r"row 1 \(id 'b'\): top-k mass 4.0000 > 1")


def test_an_actual_token_rank_below_one_is_refused():
    ex = example("b")
    ex.target_ranks[0] = 0
    table, _ = encode([example("a"), ex])
    refused(table, r"row 1 \(id 'b'\): actual-token rank 0 < 1")


def test_ids_and_sources_are_bounded_in_size():
    table, _ = encode([example("x" * (S.MAX_ID_CHARS + 1))])
    refused(table, rf"row 0: id of {S.MAX_ID_CHARS + 1} characters, more than the {S.MAX_ID_CHARS}")
    table, _ = encode([example(source="s" * (S.MAX_ID_CHARS + 1))])
    refused(table, "row 0: source of 4097 characters")
    assert decoded(encode([example("x" * S.MAX_ID_CHARS)])[0])[0].id == "x" * S.MAX_ID_CHARS


def test_an_empty_id_in_a_table_is_refused():
    table, _ = encode([example()])
    refused(replace_column(table, "id", [""]), r"t, row 0: empty example id")


@pytest.mark.parametrize(
    "cell, pattern",
    [
        ("[1, 2]", r"row 0 \(id 'a'\): meta must be a JSON object"),
        ('{"a": 1, "a": 2}', "key 'a' appears twice"),
        ("", r"row 0 \(id 'a'\): meta is not valid JSON"),
        ('{"x": NaN}', r"row 0 \(id 'a'\): meta: NaN is not JSON"),
    ],
)
def test_a_meta_cell_must_be_a_strict_json_object(cell, pattern):
    table, _ = encode([example()])
    refused(replace_column(table, "meta", [cell]), pattern)


def test_num_targets_must_add_up_to_the_streams_positions():
    table, _ = encode([example()])
    refused(replace_column(table, "num_targets", [2]), "num_targets add up to 2 but the streams hold 3 positions")


def test_nulls_inside_input_ids_are_refused():
    table, _ = encode([example()])
    refused(replace_column(table, "input_ids", [[1, None, 3, 4, 5, 6]]), "column input_ids has null values")


def test_a_stream_cut_short_is_a_format_error_naming_the_table():
    table, _ = encode([example()])
    cut = table.column("topk_top1")[0].as_py()[:-1]
    with pytest.raises(FormatError, match="^t: topk_top1 has 5 bytes, not a multiple of 2"):
        decoded(replace_column(table, "topk_top1", [cut]))


# ---- ShardFile on a real cache -------------------------------------------------------------


@pytest.fixture
def small_cache(tmp_path, rng):
    exs = [make_example(rng, i) for i in range(10)]
    write_cache(
        tmp_path / "c", exs, row_group_positions=32, shard_max_bytes=1 << 20
    )  # one shard, several row groups (>= 2 on every seed)
    return tmp_path / "c", exs


def test_a_shard_file_reads_its_row_groups_as_the_reader_does(small_cache):
    path, exs = small_cache
    files, manifest = open_cache(path), load_manifest(path)
    shard = ShardFile(files, manifest, 0)
    try:
        assert shard.name == "part-00000.parquet" and shard.k == 8 and shard.num_row_groups >= 2
        assert sum(shard.rows(g) for g in range(shard.num_row_groups)) == manifest["shards"][0]["rows"] == 10
        got = [e.id for g in range(shard.num_row_groups) for e in shard.examples(g)]
        assert got == [e.id for e in exs] == [e.id for e in CacheReader(path, prefetch=0)]
        first = shard.examples(0, rows=1)
        assert len(first) == 1 and first[0].id == exs[0].id
        assert shard.read(1, columns=["id"]).column_names == ["id"]
    finally:
        shard.close()


def test_a_shard_file_hashes_first_when_asked_so_a_broken_footer_is_a_checksum_error(small_cache):
    path, _ = small_cache
    manifest = load_manifest(path)
    data = bytearray((path / "part-00000.parquet").read_bytes())
    data[-1] ^= 0xFF  # the trailing magic: the footer no longer parses
    (path / "part-00000.parquet").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="part-00000.parquet"):
        ShardFile(open_cache(path), manifest, 0, hash_first=True)
    with pytest.raises(FormatError, match="part-00000.parquet: not a readable Parquet file") as info:
        ShardFile(open_cache(path), manifest, 0)
    assert not isinstance(info.value, ChecksumError)


def test_a_shard_file_checks_the_hash_before_a_row_group_unless_told_not_to(small_cache):
    path, exs = small_cache
    edit_manifest(path, lambda m: m["shards"][0].update(sha256="0" * 64))
    manifest = load_manifest(path)
    shard = ShardFile(open_cache(path), manifest, 0)
    with pytest.raises(ChecksumError, match="part-00000.parquet"):
        shard.read(0)
    shard.close()
    unverified = ShardFile(open_cache(path), manifest, 0, verify=False)
    assert unverified.examples(0)[0].id == exs[0].id
    unverified.close()


def test_a_shard_file_refuses_a_size_other_than_the_manifests_before_reading(small_cache):
    path, _ = small_cache
    with open(path / "part-00000.parquet", "ab") as f:
        f.write(b"x")
    with pytest.raises(ChecksumError, match=r"part-00000.parquet: \d+ bytes, the manifest says"):
        ShardFile(open_cache(path), load_manifest(path), 0)


def test_the_expansion_bound_compares_the_footers_sizes(small_cache, monkeypatch):
    path, _ = small_cache
    manifest = load_manifest(path)
    monkeypatch.setattr(S, "MAX_ROW_GROUP_FLOOR", 0)  # judge this small shard by the ratio alone
    shard = ShardFile(open_cache(path), manifest, 0)
    assert shard.read(0).num_rows == shard.rows(0)  # kdcache's own shards expand far less than 64x
    monkeypatch.setattr(S, "MAX_EXPANSION", 1)
    with pytest.raises(FormatError, match=r"row group 0: declares \d+ bytes uncompressed from \d+ stored .*bomb"):
        shard.read(0)
    shard.close()


def test_a_shard_file_uses_the_manifests_row_limits(small_cache):
    path, _ = small_cache
    manifest = load_manifest(path)
    shard = ShardFile(open_cache(path), manifest, 0, limits={**row_limits(manifest), "max_tokens": 7})
    with pytest.raises(FormatError, match=r"part-00000.parquet, row group 0, row \d+ .*more than the 7"):
        shard.examples(0)
    shard.close()
