"""Shard schema v2 (written; v1 read): one Parquet row per example. docs/FORMAT.md is the full specification.

The format version is the codec's version (formats/codec.py): version 1 shards hold codec v1's streams,
version 2 shards codec v2's. Readers take both; a version paired with the other codec is refused."""

from __future__ import annotations

import base64
import json

import numpy as np
import pyarrow as pa

from formats.codec import CODEC_NAMES, CODEC_VERSION, CodecConfig, stream_names
from formats.errors import FormatError
from formats.trust import exact_int, loads, printable

FORMAT_VERSION = CODEC_VERSION  # written
READ_VERSIONS = tuple(CODEC_NAMES)  # read: 1, 2
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
CARD_NAME = "README.md"
SHARD_SUFFIX = ".parquet"
METADATA_KEY = b"kdcache"  # Parquet key-value metadata of every shard

# Plain columns (readable as they are) and codec streams (binary; see formats/codec.py).
PLAIN_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("target_starts", pa.list_(pa.int32()), nullable=False),
    pa.field("target_ends", pa.list_(pa.int32()), nullable=False),
    pa.field("num_targets", pa.int32(), nullable=False),
    pa.field("finish_reason", pa.string()),
    pa.field("meta", pa.string()),
]
TARGET_STREAMS = ["target_logprob", "target_rank"]


def arrow_schema(id_bytes: int, metadata: dict | None = None, version: int = FORMAT_VERSION) -> pa.Schema:
    """The shard's columns; with `metadata`, an in-memory schema carrying the kdcache key too. Files do not
    carry it in their schema: the writer adds it once to the footer (`shard_key_value`), because pyarrow copies
    a schema's metadata into the footer's serialized Arrow schema as well: the hot-id table twice."""
    streams = TARGET_STREAMS + stream_names(version, id_bytes)
    fields = PLAIN_FIELDS + [pa.field(name, pa.binary(), nullable=False) for name in streams]
    return pa.schema(fields, metadata=None if metadata is None else shard_key_value(metadata))


def shard_key_value(metadata: dict) -> dict[bytes, bytes]:
    """The shard's Parquet key-value metadata: {b"kdcache": its JSON} (ParquetWriter.add_key_value_metadata)."""
    return {METADATA_KEY: json.dumps(metadata).encode()}


def shard_metadata(codec: dict, id_bytes: int, hot_table: np.ndarray) -> dict:
    return {
        "format_version": CodecConfig.from_dict(codec).version,  # the codec's version is the format's
        "codec": codec,
        "id_bytes": id_bytes,
        "hot_table": base64.b64encode(np.asarray(hot_table, "<u4").tobytes()).decode(),
    }


ID_BYTES = (2, 4)
SHARD_METADATA_KEYS = ("format_version", "codec", "id_bytes", "hot_table")
MAX_SHARD_METADATA_BYTES = (
    1 << 20
)  # a hot table of 65535 ids is 350 KB of base64  # bytes per id code the writer uses (formats.codec.code_bytes)


def read_shard_metadata(
    schema: pa.Schema, where: str, check_columns: bool = True, key_value: dict | None = None
) -> dict:
    """A shard's kdcache key-value metadata, checked (types, bounds); FormatError naming the field.

    key_value: the file footer's key-value metadata (`ParquetFile.metadata.metadata`), where every kdcache
    shard holds the key (older shards in their serialized Arrow schema too); None: `schema`'s own metadata
    (an in-memory table)."""
    raw = (key_value if key_value is not None else schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise FormatError(f"{where}: not a kdcache shard (no '{METADATA_KEY.decode()}' key in the Parquet metadata)")
    key = f"the '{METADATA_KEY.decode()}' metadata"
    meta = loads(raw, where, max_bytes=MAX_SHARD_METADATA_BYTES, what=key)
    if not isinstance(meta, dict):
        raise FormatError(f"{where}: {key} must be a JSON object, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(SHARD_METADATA_KEYS))
    if unknown:
        raise FormatError(
            f"{where}: {key} has keys this kdcache does not know: {printable(unknown)[:200]}; "
            "upgrade kdcache, or the shard is not kdcache's"
        )
    check_version(meta.get("format_version"), where)
    codec = CodecConfig.from_dict(meta.get("codec"), f"{where}: {key}, codec")
    check_codec_version(meta["format_version"], codec, f"{where}: {key}")
    if not exact_int(meta.get("id_bytes")) or meta["id_bytes"] not in ID_BYTES:
        raise FormatError(
            f"{where}: {key}: id_bytes is {printable(repr(meta.get('id_bytes')))[:40]}, must be one of {ID_BYTES}"
        )
    meta["hot_table"] = _hot_table(meta.get("hot_table"), codec.hot, meta["id_bytes"], f"{where}: {key}: hot_table")
    if not check_columns:
        return meta
    expected = arrow_schema(meta["id_bytes"], {}, codec.version)
    missing = [name for name in expected.names if name not in schema.names]
    if missing:
        raise FormatError(f"{where}: columns missing from the shard: {', '.join(missing)}")
    extra = [name for name in schema.names if name not in expected.names]
    if extra or len(schema.names) != len(expected.names):
        raise FormatError(
            f"{where}: columns the kdcache schema does not have: {printable(extra)[:200]} "
            "(or a column twice); a shard holds exactly the schema's columns"
        )
    wrong = [
        f"{f.name} is {schema.field(f.name).type}, expected {f.type}"
        for f in expected
        if not schema.field(f.name).type.equals(f.type)
    ]
    if wrong:  # the decoder reads these buffers as the schema says: another type is not coerced
        raise FormatError(f"{where}: column types differ from the kdcache schema: {'; '.join(wrong)}")
    return meta


def check_shard_header(meta: dict, num_rows: int, entry: dict, manifest_codec: dict, where: str) -> None:
    """A shard's own header against its manifest entry: the same codec, the rows the manifest lists."""
    if meta["codec"] != manifest_codec:
        raise FormatError(
            f"{where}: the codec in its kdcache metadata ({meta['codec']}) differs from the manifest's "
            f"({manifest_codec}); a shard of another cache?"
        )
    if num_rows != entry["rows"]:
        raise FormatError(f"{where}: {num_rows} rows, the manifest says {entry['rows']}")


def _hot_table(value, hot: int, id_bytes: int, where: str) -> np.ndarray:
    """The base64 hot-id table: at most `hot` distinct int32 ids whose codes fit `id_bytes`."""
    try:
        data = base64.b64decode(value, validate=True)
    except (TypeError, ValueError) as exc:  # binascii.Error is a ValueError
        raise FormatError(f"{where}: not base64 ({exc})") from None
    if len(data) % 4:
        raise FormatError(f"{where}: {len(data)} bytes, not a whole number of uint32 ids")
    table = np.frombuffer(data, "<u4")
    if len(table) > hot or len(table) >= 1 << (8 * id_bytes):
        raise FormatError(
            f"{where}: {len(table)} ids, more than the codec's hot={hot} (or than {id_bytes}-byte codes hold)"
        )
    if len(table) and (table.max() >= 2**31 or len(np.unique(table)) != len(table)):
        raise FormatError(f"{where}: ids must be distinct and below 2**31")
    return table


def check_version(version, where: str) -> None:
    if type(version) is not int or version not in READ_VERSIONS:  # JSON true and 1.0 equal 1 in Python
        raise FormatError(
            f"{where}: format version {printable(repr(version))[:40]} is not supported by this kdcache (it reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}); upgrade kdcache, or re-create the cache with this version"
        )


def check_codec_version(version: int, codec: CodecConfig, where: str) -> None:
    """Format version v holds codec v's streams: another pairing is a damaged or hand-made file."""
    if codec.version != version:
        raise FormatError(
            f"{where}: format version {version} with codec {CODEC_NAMES[codec.version]} (version {version} "
            f"caches use {CODEC_NAMES[version]}); a damaged or hand-edited file"
        )
