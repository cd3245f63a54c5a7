"""Examples <-> Arrow tables of one shard (the codec applied row by row, decoded column-wise)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from formats import codec as C
from formats.errors import FormatError
from formats.example import Example
from formats.schema import PLAIN_FIELDS, TARGET_STREAMS, TOPK_STREAMS, arrow_schema, code_streams


def spans(positions: np.ndarray) -> tuple[list[int], list[int]]:
    """Sorted positions -> [start, end) runs."""
    p = np.asarray(positions, np.int64)
    if len(p) == 0:
        return [], []
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    starts = p[np.concatenate([[0], breaks])]
    ends = p[np.concatenate([breaks - 1, [len(p) - 1]])] + 1
    return starts.tolist(), ends.tolist()


def check_example(ex: Example) -> None:
    """Raise ValueError naming the field when an example is inconsistent."""
    L, N = len(ex.input_ids), len(ex.target_positions)
    where = f"example {ex.id!r}"
    if not isinstance(ex.id, str) or not ex.id:
        raise ValueError(f"{where}: id must be a non-empty string")
    if N and (ex.target_positions[0] < 1 or ex.target_positions[-1] >= L):
        raise ValueError(f"{where}: target positions must lie in 1..{L - 1} (position 0 has no prediction)")
    if N > 1 and np.any(np.diff(ex.target_positions) <= 0):
        raise ValueError(f"{where}: target_positions must be strictly increasing")
    for name in ("topk_ids", "topk_logprobs"):
        arr = getattr(ex, name)
        if arr.ndim != 2 or arr.shape[0] != N:
            raise ValueError(f"{where}: {name} has shape {arr.shape}, expected [{N}, K]")
    for name in ("target_logprobs", "target_ranks"):
        if len(getattr(ex, name)) != N:
            raise ValueError(f"{where}: {name} has {len(getattr(ex, name))} values, expected {N}")


def encode_rows(examples: list[Example], cfg: C.CodecConfig, codes: C.IdCodes, id_bytes: int, metadata: dict) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in PLAIN_FIELDS}
    streams: dict[str, list] = {n: [] for n in TARGET_STREAMS + TOPK_STREAMS + code_streams(id_bytes)}
    for ex in examples:
        s, e = spans(ex.target_positions)
        cols["id"].append(ex.id)
        cols["source"].append(ex.source)
        cols["input_ids"].append(np.asarray(ex.input_ids, np.int32))
        cols["target_starts"].append(s)
        cols["target_ends"].append(e)
        cols["num_targets"].append(ex.num_targets)
        cols["finish_reason"].append(ex.finish_reason)
        cols["meta"].append(json.dumps(ex.meta) if ex.meta else None)
        encoded = C.encode_topk(ex.topk_ids, ex.topk_logprobs, cfg, codes, id_bytes)
        encoded.update(C.encode_target(ex.target_logprobs, ex.target_ranks))
        for name, value in encoded.items():
            streams[name].append(value)
    schema = arrow_schema(id_bytes, metadata)
    arrays = [pa.array(cols[f.name], type=f.type) for f in PLAIN_FIELDS]
    arrays += [pa.array(streams[name], type=pa.binary()) for name in schema.names[len(PLAIN_FIELDS):]]
    return pa.Table.from_arrays(arrays, schema=schema)


def column_bytes(table: pa.Table, name: str) -> memoryview:
    """The concatenated values of a binary column (all rows, in order) without copying per row."""
    arr = table.column(name).combine_chunks()
    if arr.null_count:
        raise FormatError(f"column {name} has null values")
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    if data is None:
        return memoryview(b"")
    return memoryview(data)[offsets[0] : offsets[-1]]


def decode_table(table: pa.Table, meta: dict, where: str = "shard") -> list[Example]:
    """Decode every row of a shard table (one row group, typically) into Examples."""
    cfg = C.CodecConfig.from_dict(meta["codec"])
    codes = meta.get("_codes") or C.IdCodes(meta["hot_table"])
    meta["_codes"] = codes
    streams = {n: column_bytes(table, n) for n in TOPK_STREAMS + code_streams(meta["id_bytes"])}
    try:
        ids, lps, _ = C.decode_topk(streams, cfg, codes)
        tlp, trank = C.decode_target({n: column_bytes(table, n) for n in TARGET_STREAMS})
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None
    n_targets = table.column("num_targets").to_numpy()
    if int(n_targets.sum()) != len(ids) or len(tlp) != len(ids):
        raise FormatError(f"{where}: num_targets add up to {int(n_targets.sum())} but the streams hold {len(ids)} positions")
    py = table.select(["id", "source", "target_starts", "target_ends", "finish_reason", "meta"]).to_pylist()
    input_ids = table.column("input_ids").combine_chunks()
    flat_ids = input_ids.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    offs = input_ids.offsets.to_numpy()
    out = []
    start = 0
    for i, row in enumerate(py):
        n = int(n_targets[i])
        positions = np.concatenate([np.arange(s, e, dtype=np.int32) for s, e in zip(row["target_starts"], row["target_ends"])]) if row["target_starts"] else np.zeros(0, np.int32)
        if len(positions) != n:
            raise FormatError(f"{where}, row {i} (id {row['id']!r}): target spans cover {len(positions)} positions, num_targets says {n}")
        sl = slice(start, start + n)
        out.append(Example(
            id=row["id"], source=row["source"] or "",
            input_ids=flat_ids[offs[i] : offs[i + 1]], target_positions=positions,
            topk_ids=ids[sl], topk_logprobs=lps[sl], target_logprobs=tlp[sl], target_ranks=trank[sl],
            finish_reason=row["finish_reason"], meta=json.loads(row["meta"]) if row["meta"] else {},
        ))
        start += n
    return out
