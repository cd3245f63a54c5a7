"""Shard schema v1: one Parquet row per example. docs/FORMAT.md is the full specification."""
from __future__ import annotations

import base64
import json

import numpy as np
import pyarrow as pa

from formats.errors import FormatError

FORMAT_VERSION = 1
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
TOPK_STREAMS = ["topk_count", "topk_top1", "topk_step", "topk_step_escape"]


def code_streams(id_bytes: int) -> list[str]:
    return [f"topk_code_b{b}" for b in range(id_bytes)]


def arrow_schema(id_bytes: int, metadata: dict) -> pa.Schema:
    streams = TARGET_STREAMS + TOPK_STREAMS[:2] + code_streams(id_bytes) + TOPK_STREAMS[2:]
    fields = PLAIN_FIELDS + [pa.field(name, pa.binary(), nullable=False) for name in streams]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode()})


def shard_metadata(codec: dict, id_bytes: int, hot_table: np.ndarray) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "codec": codec,
        "id_bytes": id_bytes,
        "hot_table": base64.b64encode(np.asarray(hot_table, "<u4").tobytes()).decode(),
    }


def read_shard_metadata(schema: pa.Schema, where: str, check_columns: bool = True) -> dict:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise FormatError(f"{where}: not a kdcache shard (no '{METADATA_KEY.decode()}' key in the Parquet metadata)")
    meta = json.loads(raw)
    check_version(meta.get("format_version"), where)
    meta["hot_table"] = np.frombuffer(base64.b64decode(meta["hot_table"]), "<u4")
    if not check_columns:
        return meta
    missing = [f.name for f in PLAIN_FIELDS if f.name not in schema.names]
    missing += [n for n in TARGET_STREAMS + TOPK_STREAMS + code_streams(meta["id_bytes"]) if n not in schema.names]
    if missing:
        raise FormatError(f"{where}: columns missing from the shard: {', '.join(missing)}")
    return meta


def check_version(version, where: str) -> None:
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{where}: format version {version!r} is not supported by this kdcache (it reads version "
            f"{FORMAT_VERSION}); upgrade kdcache, or re-create the cache with this version"
        )
