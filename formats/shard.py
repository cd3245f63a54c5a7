"""Examples <-> Arrow tables of one shard (the codec applied row by row, decoded column-wise)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow as pa

from formats import codec as C
from formats.errors import FormatError, InputError
from formats.example import Example
from formats.trust import loads
from formats.schema import (
    PLAIN_FIELDS,
    TARGET_STREAMS,
    arrow_schema,
    check_shard_header,
    read_shard_metadata,
)


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
    """Raise InputError naming the example and field (and position) when an example is inconsistent."""
    L, N = len(ex.input_ids), len(ex.target_positions)
    where = f"example {ex.id!r}"
    if not isinstance(ex.id, str) or not ex.id:
        raise InputError(f"{where}: id must be a non-empty string")
    if N and (ex.target_positions[0] < 1 or ex.target_positions[-1] >= L):
        raise InputError(f"{where}: target positions must lie in 1..{L - 1} (position 0 has no prediction)")
    if N > 1 and np.any(np.diff(ex.target_positions) <= 0):
        raise InputError(f"{where}: target_positions must be strictly increasing")
    for name in ("topk_ids", "topk_logprobs"):
        arr = getattr(ex, name)
        if arr.ndim != 2 or arr.shape[0] != N:
            raise InputError(f"{where}: {name} has shape {arr.shape}, expected [{N}, K]")
    for name in ("target_logprobs", "target_ranks"):
        if len(getattr(ex, name)) != N:
            raise InputError(f"{where}: {name} has {len(getattr(ex, name))} values, expected {N}")
    for name in ("topk_logprobs", "target_logprobs"):
        bad = np.isnan(getattr(ex, name)) | np.isposinf(getattr(ex, name))
        if bad.any():
            row = int(np.nonzero(bad)[0][0])
            raise InputError(
                f"{where}, position {int(ex.target_positions[row])} (teacher row {row}): {name} holds "
                f"{getattr(ex, name)[bad][0]} — not a logprob (a teacher overflow upstream?); "
                "a NaN would be stored as a wrong number, so it is refused"
            )


def encode_rows(
    examples: list[Example], cfg: C.CodecConfig, codes: C.IdCodes, id_bytes: int, metadata: dict
) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in PLAIN_FIELDS}
    streams: dict[str, list] = {n: [] for n in TARGET_STREAMS + C.stream_names(cfg.version, id_bytes)}
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
    schema = arrow_schema(id_bytes, metadata, cfg.version)
    arrays = [pa.array(cols[f.name], type=f.type) for f in PLAIN_FIELDS]
    arrays += [pa.array(streams[name], type=pa.binary()) for name in schema.names[len(PLAIN_FIELDS) :]]
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


def decode_table(table: pa.Table, meta: dict, where: str = "shard", limits: dict | None = None) -> list[Example]:
    """Decode every row of a shard table (one row group, typically) into Examples.

    Every row's target spans are checked (check_spans), so each Example is sound: trained
    positions in 1..L-1, strictly increasing, one teacher row each. `limits` (the manifest's
    formats.manifest.row_limits) bounds each row's tokens and its finish_reason; ids, sources and
    meta cells are bounded in size and meta is strict JSON (formats.trust.loads).
    """
    cfg = C.CodecConfig.from_dict(meta["codec"], f"{where}: codec")
    codes = meta.get("_codes") or C.IdCodes(meta["hot_table"])
    meta["_codes"] = codes
    _check_not_null(table, where)
    streams = {n: column_bytes(table, n) for n in C.stream_names(cfg.version, meta["id_bytes"])}
    try:
        ids, lps, _ = C.decode_topk(streams, cfg, codes, trim=True)
        tlp, trank = C.decode_target({n: column_bytes(table, n) for n in TARGET_STREAMS})
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None
    n_targets = table.column("num_targets").to_numpy().astype(np.int64)
    if int(n_targets.sum()) != len(ids) or len(tlp) != len(ids):
        raise FormatError(
            f"{where}: num_targets add up to {int(n_targets.sum())} but the streams hold {len(ids)} positions"
        )
    input_ids = table.column("input_ids").combine_chunks()
    flat_ids = input_ids.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    offs = input_ids.offsets.to_numpy()
    lengths = np.diff(offs)
    if limits is not None:
        _check_row_limits(table, lengths, limits, where)
    positions = check_spans(table, lengths, n_targets, where)
    if limits is not None:
        _check_values(table, flat_ids, offs, n_targets, ids, lps, trank, limits["ids"], where)
    py = table.select(["id", "source", "finish_reason", "meta"]).to_pylist()
    for i, row in enumerate(py):
        if not row["id"]:
            raise FormatError(f"{where}, row {i}: empty example id (ids must be non-empty strings)")
        for name, cap in (("id", MAX_ID_CHARS), ("source", MAX_ID_CHARS), ("meta", MAX_META_BYTES)):
            if row[name] is not None and len(row[name]) > cap:
                raise FormatError(
                    f"{where}, row {i}: {name} of {len(row[name])} characters, more than the {cap} a row may hold"
                )
    out = []
    start = 0
    for i, row in enumerate(py):
        sl = slice(start, start + int(n_targets[i]))
        out.append(
            Example(
                id=row["id"],
                source=row["source"] or "",
                input_ids=flat_ids[offs[i] : offs[i + 1]],
                target_positions=positions[sl],
                topk_ids=ids[sl],
                topk_logprobs=lps[sl],
                target_logprobs=tlp[sl],
                target_ranks=trank[sl],
                finish_reason=row["finish_reason"],
                meta=_row_meta(row, where, i),
            )
        )
        start = sl.stop
    return out


MASS_SLACK = 0.02  # quantization (<0.016 nat per entry) can lift a full top-k's mass slightly above 1


def _check_values(table, flat_ids, offs, n_targets, ids, lps, ranks, id_limits: dict, where: str) -> None:
    """The values a trainer relies on, vectorized over the row group: teacher ids below the teacher's
    output size, input ids in range, top-k mass <= 1 (+ quantization slack), actual-token ranks >= 1.
    (Logprobs <= 0 in rank order hold by the codec's construction.)"""

    def bad_position(mask, what):
        p = int(np.flatnonzero(mask)[0])
        row = int(np.searchsorted(np.cumsum(n_targets), p, side="right"))
        _bad_row(table, row, where, what)

    limit, text = id_limits["topk"]
    if limit is not None and ids.size and int(ids.max()) >= limit:
        bad_position(ids.max(axis=1) >= limit, f"teacher token id {int(ids.max())} >= {text}")
    limit, text = id_limits["input"]
    if len(flat_ids) and (flat_ids.min() < 0 or (limit is not None and flat_ids.max() >= limit)):
        bad = (flat_ids < 0) | (flat_ids >= (limit if limit is not None else np.iinfo(np.int32).max))
        row = int(np.searchsorted(offs[1:], int(np.flatnonzero(bad)[0]), side="right"))
        _bad_row(table, row, where, f"input_ids outside 0..{text}")
    if len(lps):
        mass = np.exp(lps).sum(axis=1, dtype=np.float64)
        if (mass > 1 + MASS_SLACK).any():
            bad_position(
                mass > 1 + MASS_SLACK,
                f"top-k mass {float(mass.max()):.4f} > 1 (the teacher's probabilities cannot add up to more than 1)",
            )
    if len(ranks) and ranks.min() < 1:
        bad_position(ranks < 1, f"actual-token rank {int(ranks.min())} < 1")


MAX_ID_CHARS = 4096  # example ids and sources (Tulu's are under 100)
MAX_META_BYTES = 64 << 20  # one row's meta (the conversation it renders)


def _check_row_limits(table: pa.Table, lengths: np.ndarray, limits: dict, where: str) -> None:
    """Each row as long as the manifest's settings allow, with the finish_reason its mode writes."""
    cap = limits["max_tokens"]
    if cap is not None and len(lengths) and lengths.max() > cap:
        row = int(np.argmax(lengths))
        _bad_row(
            table,
            row,
            where,
            f"{int(lengths[row])} tokens, more than the {cap} the manifest's settings allow "
            "(extra.template.max_length; a shard of another cache?)",
        )
    allowed = limits["finish_reasons"]
    reasons = table.column("finish_reason").to_pylist()
    for row, reason in enumerate(reasons):
        if reason not in allowed:
            _bad_row(
                table,
                row,
                where,
                f"finish_reason {reason!r:.40} in a {limits['mode']}-mode cache (allowed: {sorted(map(str, allowed))})",
            )


def check_spans(table: pa.Table, lengths: np.ndarray, n_targets: np.ndarray, where: str) -> np.ndarray:
    """Check every row's target spans; return all rows' trained positions, concatenated (int32).

    A row's spans must satisfy 1 <= start < end <= L (its number of tokens), be sorted and not
    overlap, and cover exactly num_targets positions. Vectorized over the table; FormatError names
    the first bad row, its id and the span.
    """
    starts, s_offs = _list_values(table, "target_starts")
    ends, e_offs = _list_values(table, "target_ends")
    per_row = np.diff(s_offs)
    if not np.array_equal(per_row, np.diff(e_offs)):
        row = int(np.flatnonzero(per_row != np.diff(e_offs))[0])
        _bad_row(table, row, where, "target_starts and target_ends have different lengths")
    span_row = np.repeat(np.arange(len(per_row)), per_row)
    length = lengths[span_row]
    follows = np.zeros(len(starts), bool)  # the span after another span of the same row
    follows[1:] = span_row[1:] == span_row[:-1]
    prev_end = np.concatenate([[0], ends[:-1]])
    checks = [
        (starts < 1, "starts before position 1 (position 0 has no prediction)"),
        (ends <= starts, "is empty or reversed (end <= start)"),
        (ends > length, "runs past the sequence end"),
        (follows & (starts < prev_end), "overlaps the previous span or is out of order (spans must be sorted)"),
    ]
    for bad, what in checks:
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            _bad_row(
                table,
                int(span_row[j]),
                where,
                f"target span [{starts[j]}, {ends[j]}) {what}; the sequence has {length[j]} tokens",
            )
    sizes = ends - starts
    covered = np.bincount(span_row, weights=sizes, minlength=len(per_row)).astype(np.int64)
    if not np.array_equal(covered, n_targets):
        row = int(np.flatnonzero(covered != n_targets)[0])
        _bad_row(table, row, where, f"target spans cover {covered[row]} positions, num_targets says {n_targets[row]}")
    # positions: for span j, starts[j] + 0..size-1
    first = np.cumsum(sizes) - sizes
    return (np.arange(int(sizes.sum()), dtype=np.int64) + np.repeat(starts - first, sizes)).astype(np.int32)


def _list_values(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list<int32> column's values (int64) and row offsets into them (starting at 0)."""
    arr = table.column(name).combine_chunks()
    offs = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)[offs[0] : offs[-1]].astype(np.int64)
    return values, offs - offs[0]


def _check_not_null(table: pa.Table, where: str) -> None:
    for name in ("id", "input_ids", "target_starts", "target_ends", "num_targets"):
        col = table.column(name).combine_chunks()
        values = col.values if name in ("input_ids", "target_starts", "target_ends") else None
        if col.null_count or (values is not None and values.null_count):
            raise FormatError(f"{where}: column {name} has null values")


def _bad_row(table: pa.Table, row: int, where: str, what: str):
    raise FormatError(
        f"{where}, row {row} (id {table.column('id')[row].as_py()!r:.200}): {what}; "
        "run `kdcache verify` on the cache, and restore or re-create it"
    )


def _row_meta(row: dict, where: str, i: int) -> dict:
    if row["meta"] is None:  # the writer stores an empty meta as null; "" is not JSON
        return {}
    meta = loads(row["meta"], f"{where}, row {i} (id {row['id']!r:.200})", max_bytes=MAX_META_BYTES, what="meta")
    if not isinstance(meta, dict):
        raise FormatError(f"{where}, row {i} (id {row['id']!r}): meta must be a JSON object")
    return meta


# ---- a listed shard, opened through the trust boundary ----------------------------------------


class ShardFile:
    """Shard `index` of a cache: a regular file of the manifest's size, a Parquet footer whose kdcache
    metadata matches the manifest, row groups read only after the file's sha256 was checked (with
    `verify`; without, every bound but the hash still holds) and only when the sizes its footer
    declares are a plausible expansion of what it stores (a decompression bomb is refused before it
    expands).

        shard = ShardFile(files, manifest, 0)
        for g in range(shard.num_row_groups):
            examples = shard.examples(g)
    """

    def __init__(
        self,
        files,
        manifest: dict,
        index: int,
        *,
        verify: bool = True,
        limits: dict | None = None,
        hash_first: bool = False,
    ):
        from formats.manifest import row_limits

        self.entry = manifest["shards"][index]
        self.name = self.entry["file"]
        self.where = files.where(self.name)
        self.limits = limits or row_limits(manifest)
        self.k = manifest["codec"]["k"]
        self._codec = manifest["codec"]
        self.file = files.open(self.name, size=self.entry["bytes"], sha256=self.entry["sha256"] if verify else None)
        if hash_first:  # verify, merge: a changed byte is a ChecksumError before the footer is parsed
            self.file.verify()
        self.pf = self._parquet()
        self.meta = read_shard_metadata(self.pf.schema_arrow, self.where, key_value=self.pf.metadata.metadata or {})
        check_shard_header(self.meta, self.pf.metadata.num_rows, self.entry, self._codec, self.where)
        self.num_row_groups = self.pf.metadata.num_row_groups

    def _parquet(self):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.file)
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise FormatError(
                f"{self.where}: not a readable Parquet file ({str(exc)[:200]!r}); run `kdcache verify` on the cache"
            ) from None

    def verify(self) -> None:
        """Hash the file (once); a remote file's footer is read again from the verified bytes."""
        if self.file.verified:
            return
        self.file.verify()
        if not self.file.local:
            before = self.pf.metadata
            self.pf = self._parquet()
            if not self.pf.metadata.equals(before):
                raise FormatError(f"{self.where}: the server sent another footer than the file's; restore it")

    def rows(self, g: int) -> int:
        return self.pf.metadata.row_group(g).num_rows

    def read(self, g: int, columns: list[str] | None = None) -> pa.Table:
        """Row group `g` (verified, bounded) as an Arrow table."""
        self.verify()
        self._check_budget(g)
        try:
            table = self.pf.read_row_group(g, columns=columns)
        except Exception as exc:
            raise FormatError(
                f"{self.where}, row group {g}: cannot be read ({str(exc)[:200]!r}); run `kdcache verify` on the cache"
            ) from None
        for name in table.column_names:  # Parquet's reader does not check that string bytes are UTF-8
            try:
                table.column(name).validate(full=True)
            except pa.ArrowInvalid as exc:
                raise FormatError(
                    f"{self.where}, row group {g}: column {name} is not valid ({str(exc)[:120]!r}: e.g. text that "
                    "is not UTF-8); a damaged or hand-made shard: run `kdcache verify` on the cache"
                ) from None
        return table

    def examples(self, g: int, rows: int | None = None) -> list[Example]:
        table = self.read(g)
        if rows is not None and rows < table.num_rows:
            table = table.slice(0, rows)
        return decode_table(table, self.meta, f"{self.where}, row group {g}", self.limits)

    def _check_budget(self, g: int) -> None:
        """The shard's uncompressed size, as its footer declares it (every row group's `total_byte_size`), at
        most MAX_EXPANSION times the bytes it stores (or MAX_ROW_GROUP_FLOOR): kdcache's streams expand 2-4x,
        a decompression bomb thousands of times. The bound is the file's own size, not a count the manifest
        claims. (Not per column chunk: pyarrow's per-column metadata accessor aborts the whole process on
        some damaged footers, fuzz case 11:8830, where reading the row group raises an error we can catch.)"""
        declared, stored = self._sizes
        budget = max(MAX_EXPANSION * stored, MAX_ROW_GROUP_FLOOR)
        if declared > budget:
            raise FormatError(
                f"{self.where}, row group {g}: declares {declared} bytes uncompressed from {stored} stored (the "
                f"shard's row groups together; more than {MAX_EXPANSION}x, and above {MAX_ROW_GROUP_FLOOR >> 20} "
                "MiB); a decompression bomb or a damaged footer: refused"
            )

    @functools.cached_property
    def _sizes(self) -> tuple[int, int]:
        """(bytes the footer declares uncompressed, all row groups; bytes of data pages: the file less its footer)."""
        meta = self.pf.metadata
        declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        return declared, max(1, self.entry["bytes"] - meta.serialized_size - 8)

    def close(self) -> None:
        self.file.close()


MAX_EXPANSION = 64  # uncompressed / compressed of a row group (kdcache writes 2-4x)
MAX_ROW_GROUP_FLOOR = 64 << 20  # below this a row group is never refused for its expansion
