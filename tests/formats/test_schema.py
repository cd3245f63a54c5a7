"""formats/schema.py: the shard schema (column names, order, types), the kdcache key-value metadata
(shard_metadata -> read_shard_metadata and every check on it), check_shard_header and check_version.
Hostile metadata in a whole cache (id_bytes, a hot table that is not base64, a codec other than the
manifest's) is in test_tools.py; extra columns through verify in test_hostile_cache.py."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pyarrow as pa
import pytest

from formats.codec import CodecConfig
from formats.errors import FormatError
from formats.codec import code_streams
from formats.schema import (
    FORMAT_VERSION,
    MAX_SHARD_METADATA_BYTES,
    METADATA_KEY,
    PLAIN_FIELDS,
    arrow_schema,
    check_shard_header,
    check_version,
    read_shard_metadata,
    shard_metadata,
)

CODEC = CodecConfig(k=8, hot=4).to_dict()
HOT = np.array([7, 3, 900, 12], np.uint32)


def schema_with(meta, id_bytes=2) -> pa.Schema:
    """The shard schema carrying `meta` (a dict, or raw bytes) as its kdcache metadata."""
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return arrow_schema(id_bytes, {}).with_metadata({METADATA_KEY: raw})


def refused(meta, pattern, id_bytes=2, schema=None):
    with pytest.raises(FormatError) as info:
        read_shard_metadata(schema or schema_with(meta, id_bytes), "s.parquet")
    message = str(info.value)
    assert message.startswith("s.parquet: ") and re.search(pattern, message), message


# ---- the schema ------------------------------------------------------------------------------


def test_code_streams_are_one_byte_plane_per_byte():
    assert code_streams(2) == ["topk_code_b0", "topk_code_b1"]
    assert code_streams(4) == ["topk_code_b0", "topk_code_b1", "topk_code_b2", "topk_code_b3"]


def test_the_column_order_is_plain_columns_then_the_codec_streams():
    schema = arrow_schema(2, {"x": 1})
    assert schema.names == [
        "id",
        "source",
        "input_ids",
        "target_starts",
        "target_ends",
        "num_targets",
        "finish_reason",
        "meta",
        "target_logprob",
        "target_rank",
        "topk_count",
        "topk_top1",
        "topk_code_b0",
        "topk_code_b1",
        "topk_step_1",
        "topk_step_2",
        "topk_step_4",
        "topk_step_16",
        "topk_step_32",
        "topk_step_64",
        "topk_step_128",
        "topk_step_escape",
    ]
    v1 = [n for n in schema.names if not n.startswith("topk_step")] + ["topk_step", "topk_step_escape"]
    assert arrow_schema(2, {}, version=1).names == v1  # format version 1: one step stream
    assert json.loads(schema.metadata[METADATA_KEY]) == {"x": 1}
    assert "topk_code_b3" in arrow_schema(4, {}).names and len(arrow_schema(4, {})) == len(schema) + 2


def test_the_column_types_and_nullability_are_the_formats():
    schema = arrow_schema(2, {})
    assert schema.field("input_ids").type == pa.list_(pa.int32()) and not schema.field("input_ids").nullable
    assert schema.field("num_targets").type == pa.int32() and not schema.field("id").nullable
    assert schema.field("finish_reason").nullable and schema.field("meta").nullable
    streams = schema.names[len(PLAIN_FIELDS) :]
    assert all(schema.field(n).type == pa.binary() and not schema.field(n).nullable for n in streams)


def test_shard_metadata_round_trips_through_read_shard_metadata():
    meta = shard_metadata(CODEC, 2, HOT)
    assert meta["format_version"] == FORMAT_VERSION and meta["codec"] == CODEC and meta["id_bytes"] == 2
    assert base64.b64decode(meta["hot_table"]) == HOT.astype("<u4").tobytes()  # little-endian uint32
    back = read_shard_metadata(schema_with(meta), "s.parquet")
    assert back["hot_table"].dtype == np.dtype("<u4") and back["hot_table"].tolist() == [7, 3, 900, 12]
    assert back["codec"] == CODEC and back["id_bytes"] == 2


def test_an_empty_hot_table_is_allowed():
    meta = shard_metadata({**CODEC, "hot": 0}, 4, np.zeros(0, np.uint32))
    assert read_shard_metadata(schema_with(meta, 4), "s")["hot_table"].size == 0


# ---- read_shard_metadata refuses ----------------------------------------------------------


def test_a_parquet_file_without_kdcache_metadata_is_not_a_shard():
    with pytest.raises(FormatError, match="^s.parquet: not a kdcache shard \\(no 'kdcache' key"):
        read_shard_metadata(arrow_schema(2, {}).remove_metadata(), "s.parquet")


def test_unknown_metadata_keys_are_refused():
    refused({**shard_metadata(CODEC, 2, HOT), "zzz": 1}, r"keys this kdcache does not know: \['zzz'\]")


@pytest.mark.parametrize("version", [3, True, 1.0, None])
def test_a_format_version_other_than_1_or_2_is_refused(version):
    refused({**shard_metadata(CODEC, 2, HOT), "format_version": version}, "format version .* is not supported")


def test_a_missing_codec_is_refused():
    meta = shard_metadata(CODEC, 2, HOT)
    del meta["codec"]
    refused(meta, "the 'kdcache' metadata, codec: must be a JSON object, got NoneType")


def test_id_bytes_must_be_2_or_4():
    refused({**shard_metadata(CODEC, 2, HOT), "id_bytes": 3}, r"id_bytes is 3, must be one of \(2, 4\)")
    refused({**shard_metadata(CODEC, 2, HOT), "id_bytes": True}, r"id_bytes is True")


def test_a_hot_table_longer_than_the_codecs_hot_is_refused():
    meta = shard_metadata(CODEC, 2, np.arange(5, dtype=np.uint32))
    refused(meta, "hot_table: 5 ids, more than the codec's hot=4")


def test_a_hot_table_whose_codes_overflow_id_bytes_is_refused():
    meta = shard_metadata({**CODEC, "hot": 1 << 17}, 2, np.arange(1 << 16, dtype=np.uint32))
    refused(meta, "hot_table: 65536 ids, more than .* than 2-byte codes hold")


@pytest.mark.parametrize("table", [[3, 5, 3], [2**31]])
def test_hot_table_ids_are_distinct_and_below_2_31(table):
    refused(shard_metadata(CODEC, 2, np.array(table, np.uint32)), r"hot_table: ids must be distinct and below 2\*\*31")


def test_metadata_above_its_cap_is_refused_before_parsing():
    raw = b'{"pad": "' + b"x" * MAX_SHARD_METADATA_BYTES + b'"}'
    refused(raw, rf"{len(raw)} bytes, more than the {MAX_SHARD_METADATA_BYTES}")


def test_deeply_nested_metadata_is_a_format_error_not_a_recursion_error():
    refused(b"[" * 100_000 + b"]" * 100_000, r"the 'kdcache' metadata nests deeper than this parser allows \(> 64\)")


def test_a_missing_column_is_named():
    schema = schema_with(shard_metadata(CODEC, 2, HOT))
    schema = schema.remove(schema.get_field_index("topk_step_4"))
    refused(None, "columns missing from the shard: topk_step_4$", schema=schema)


def test_a_version_1_shard_needs_version_1_columns():
    v1 = CodecConfig(k=8, hot=4, version=1).to_dict()
    meta = {**shard_metadata(v1, 2, HOT)}
    assert meta["format_version"] == 1
    read_shard_metadata(arrow_schema(2, {}, version=1).with_metadata({METADATA_KEY: json.dumps(meta).encode()}), "s")
    refused(meta, "columns missing from the shard: topk_step$")  # a version 2 column set


def test_a_shard_with_4_byte_codes_needs_all_four_planes():
    schema = schema_with(shard_metadata(CODEC, 4, HOT))  # the 2-byte schema, metadata saying 4
    refused(None, "columns missing from the shard: topk_code_b2, topk_code_b3", schema=schema)


def test_a_column_twice_is_refused():
    schema = schema_with(shard_metadata(CODEC, 2, HOT))
    schema = schema.append(schema.field("meta"))
    refused(None, r"columns the kdcache schema does not have: \[\] \(or a column twice\)", schema=schema)


def test_a_column_of_another_type_is_refused_not_coerced():
    schema = schema_with(shard_metadata(CODEC, 2, HOT))
    i = schema.get_field_index("input_ids")
    schema = schema.set(i, pa.field("input_ids", pa.list_(pa.int64()), nullable=False))
    schema = schema.set(schema.get_field_index("topk_top1"), pa.field("topk_top1", pa.large_binary()))
    refused(
        None,
        r"column types differ from the kdcache schema: input_ids is list<item: int64>, expected "
        r"list<item: int32>; topk_top1 is large_binary, expected binary",
        schema=schema,
    )


def test_columns_are_not_checked_when_not_asked():
    schema = pa.schema(
        [pa.field("id", pa.string())], metadata={METADATA_KEY: json.dumps(shard_metadata(CODEC, 2, HOT)).encode()}
    )
    assert read_shard_metadata(schema, "s", check_columns=False)["id_bytes"] == 2
    with pytest.raises(FormatError, match="columns missing"):
        read_shard_metadata(schema, "s")


# ---- check_shard_header, check_version ---------------------------------------------------


def test_check_shard_header_compares_the_codec_and_the_rows_with_the_manifest():
    meta = {"codec": CODEC}
    check_shard_header(meta, 12, {"rows": 12}, dict(CODEC), "s.parquet")
    with pytest.raises(FormatError, match=r"^s.parquet: 11 rows, the manifest says 12$"):
        check_shard_header(meta, 11, {"rows": 12}, CODEC, "s.parquet")
    with pytest.raises(FormatError, match="^s.parquet: the codec in its kdcache metadata .* a shard of another cache"):
        check_shard_header(meta, 12, {"rows": 12}, {**CODEC, "mass": 0.9}, "s.parquet")


def test_check_version_accepts_exactly_the_integers_1_and_2():
    check_version(1, "m")
    check_version(2, "m")
    for version in (True, 1.0, "1", 3, 0, [1]):
        with pytest.raises(FormatError, match=r"^m: format version .* \(it reads versions 1, 2\)"):
            check_version(version, "m")


def test_check_version_shows_a_hostile_value_escaped_and_short():
    with pytest.raises(FormatError) as info:
        check_version("\x1b]0;" + "v" * 200, "m")
    assert "\x1b" not in str(info.value) and "v" * 50 not in str(info.value)
