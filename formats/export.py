"""`kdcache export CACHE OUT --format decoded|axolotl`: a cache as plain Parquet columns that other tools
read with no kdcache code (`datasets`, DuckDB, Polars, pandas, axolotl's KD plugin).

decoded (one row per example; lists as long as the sequence, Hugging Face's unshifted layout of
formats.batch.example_rows): id, source, input_ids list<int32>, labels list<int64> (the token where
trained, -100 elsewhere), target_token_ids list<list<int32>> and target_logprobs list<list<float32>>
(at position t: the teacher's stored entries for token t in rank order, raw logprobs at temperature 1,
as many as the cache keeps there; an empty list where t is not trained), finish_reason, meta (JSON).

axolotl (the columns axolotl's KD trainer reads when a dataset is already tokenized, v0.19:
src/axolotl/integrations/kd/trainer.py compute_loss, kernels/liger.py; docs/EXPORT.md has the reading):
input_ids, attention_mask, labels (unshifted: axolotl shifts them for its CE) and, per position p,
target_token_ids / target_logprobs / target_mask list<list<...>> of exactly K entries for the token the
hidden state at p predicts, p + 1 (axolotl pairs hidden state p with target row p and does not shift
the targets); target_mask 1 where labels[p + 1] is trained and the entry exists. The teacher's top-k
is renormalized and brought to `temperature` as axolotl's own KD prompt strategy does
(p^(1/T) / sum p^(1/T) over the stored entries), since its trainer uses the stored values as given.

Streaming: the cache is read example by example (verified as read: sizes and sha256) and written in
part files of `rows_per_file` examples, each written atomically (a temporary name, then a rename);
`_export.json` (the parts, their rows and sha256, the source's manifest hash) is written last. A rerun
after a crash keeps the parts already written and writes the rest; a finished export is left as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from formats.batch import example_rows
from formats.errors import InputError
from formats.reader import CacheReader
from formats.safe_write import AtomicFile, make_folder, write_json_atomic

FORMATS = ("decoded", "axolotl")
DONE_NAME = "_export.json"  # a leading "_": Parquet readers of the folder skip it
SETTINGS_NAME = "_export_settings.json"


def _schema(fmt: str):
    import pyarrow as pa

    lists = {
        "target_token_ids": pa.list_(pa.list_(pa.int32())),
        "target_logprobs": pa.list_(pa.list_(pa.float32())),
    }
    if fmt == "decoded":
        fields = [
            ("id", pa.string()),
            ("source", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int64())),
            *lists.items(),
            ("finish_reason", pa.string()),
            ("meta", pa.string()),
        ]
    else:
        fields = [
            ("input_ids", pa.list_(pa.int64())),
            ("attention_mask", pa.list_(pa.int8())),
            ("labels", pa.list_(pa.int64())),
            *lists.items(),
            ("target_mask", pa.list_(pa.list_(pa.int8()))),
        ]
    return pa.schema(fields)


def _lists(values: np.ndarray, lengths: np.ndarray):
    """A pyarrow list array from flat values and each list's length (no Python objects per element)."""
    import pyarrow as pa

    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def decoded_columns(ex) -> dict:
    """One example in the `decoded` layout: {column: (flat values, inner lengths or None)}."""
    length = len(ex.input_ids)
    counts = np.zeros(length, np.int32)
    keep = ex.topk_ids >= 0
    counts[ex.target_positions] = keep.sum(axis=1)
    return {
        "input_ids": ex.input_ids.astype(np.int32),
        "labels": ex.labels,
        "target_token_ids": (ex.topk_ids[keep].astype(np.int32), counts),
        "target_logprobs": (ex.topk_logprobs[keep].astype(np.float32), counts),
    }


def axolotl_columns(ex, k: int, temperature: float = 1.0) -> dict:
    """One example in the `axolotl` layout (K = k entries per position)."""
    rows = example_rows(ex, k)
    length = len(rows)
    ids = np.zeros((length, k), np.int32)
    lps = np.full((length, k), -np.inf, np.float32)
    mask = np.zeros((length, k), np.int8)
    nxt_ids, nxt_lps = rows.topk_ids[1:], rows.topk_logprobs[1:].astype(np.float64)  # row p <- token p + 1
    present = (nxt_ids >= 0) & (rows.labels[1:, None] != -100)
    scaled = np.where(present, nxt_lps / temperature, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        top = scaled.max(axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        log_norm = np.log(np.exp(scaled - top).sum(axis=1, keepdims=True)) + top
        renorm = np.where(present, scaled - log_norm, -np.inf)
    ids[:-1] = np.where(present, nxt_ids, 0)
    lps[:-1] = renorm.astype(np.float32)
    mask[:-1] = present
    inner = np.full(length, k, np.int32)
    return {
        "input_ids": rows.input_ids,
        "attention_mask": np.ones(length, np.int8),
        "labels": rows.labels,
        "target_token_ids": (ids.reshape(-1), inner),
        "target_logprobs": (lps.reshape(-1), inner),
        "target_mask": (mask.reshape(-1), inner),
    }


def _table(fmt: str, examples: list, columns: list[dict]):
    """The row group of `examples` (their columns built by decoded_columns / axolotl_columns)."""
    import pyarrow as pa

    schema = _schema(fmt)
    arrays = {}
    lengths = np.array([len(c["labels"]) for c in columns], np.int32)
    for name in columns[0]:
        parts = [c[name] for c in columns]
        if isinstance(parts[0], tuple):  # list<list<...>>: flat values, inner lengths
            inner = _lists(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
            offsets = np.zeros(len(lengths) + 1, np.int32)
            np.cumsum(lengths, out=offsets[1:])
            arrays[name] = pa.ListArray.from_arrays(pa.array(offsets), inner)
        else:
            arrays[name] = _lists(np.concatenate(parts), lengths)
    if fmt == "decoded":
        arrays["id"] = pa.array([ex.id for ex in examples], pa.string())
        arrays["source"] = pa.array([ex.source for ex in examples], pa.string())
        arrays["finish_reason"] = pa.array([ex.finish_reason for ex in examples], pa.string())
        arrays["meta"] = pa.array(
            [json.dumps(ex.meta, ensure_ascii=False, allow_nan=False) for ex in examples], pa.string()
        )
    return pa.Table.from_arrays([arrays[f.name].cast(f.type) for f in schema], schema=schema)


ROW_GROUP_POSITIONS = 65536  # tokens per Parquet row group (as the cache's writer)


def export_cache(
    cache,
    out,
    *,
    fmt: str = "decoded",
    temperature: float = 1.0,
    rows_per_file: int = 10_000,
    progress: bool = True,
    verify: bool = True,
    storage_options: dict | None = None,
    staging=None,
) -> dict:
    """Write `cache` to the folder `out` in `fmt` (module docstring); returns export.json's contents. An
    object-store URL `out` is exported into a local staging folder and uploaded, `_export.json` last
    (_export_to_store)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    if not (0 < temperature < float("inf")):
        raise InputError(f"--temperature {temperature}: must be a finite number > 0")
    if fmt == "decoded" and temperature != 1.0:
        raise InputError("--temperature applies to --format axolotl only (decoded keeps the raw logprobs)")
    if rows_per_file < 1:
        raise InputError(f"--rows-per-file {rows_per_file}: must be >= 1")
    from formats.remote_write import check_writable, is_remote, local_path

    check_writable(str(out), "export OUT")  # a read-only protocol or a missing backend: before any reading
    reader = CacheReader(cache, prefetch=2, verify=verify, storage_options=storage_options)
    source = hashlib.sha256(json.dumps(reader.manifest, sort_keys=True).encode()).hexdigest()
    settings = {"format": fmt, "temperature": temperature, "rows_per_file": rows_per_file, "source_manifest": source}
    if is_remote(out):
        local = dict(fmt=fmt, temperature=temperature, rows_per_file=rows_per_file, progress=progress, verify=verify)
        return _export_to_store(
            str(out),
            settings,
            lambda folder: export_cache(cache, folder, storage_options=storage_options, **local),
            staging,
        )
    out = make_folder(local_path(out))
    done = out / DONE_NAME
    if done.exists():
        record = json.loads(done.read_text())
        if {key: record.get(key) for key in settings} != settings:
            raise InputError(f"{out} holds another export ({DONE_NAME}); give a new folder")
        return record
    settings_file = out / SETTINGS_NAME
    if settings_file.exists():
        if json.loads(settings_file.read_text()) != settings:
            raise InputError(
                f"{out} holds a partial export of another cache or with other settings ({SETTINGS_NAME}); "
                "give a new folder, or the same cache and settings to resume it"
            )
    elif any(out.iterdir()):
        raise InputError(f"{out} is not empty; give a new folder")
    else:
        write_json_atomic(settings_file, settings)
    k = int(reader.manifest["codec"]["k"])
    total = reader.num_examples()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="ex", desc=f"export {fmt}", dynamic_ncols=True)
    parts: list[dict] = []
    state = {"examples": [], "columns": [], "positions": 0, "writer": None, "file": None, "rows": 0}

    def write_group():
        if not state["examples"]:
            return
        if state["file"] is not None:
            state["writer"].write_table(_table(fmt, state["examples"], state["columns"]))
        state["examples"], state["columns"], state["positions"] = [], [], 0

    def close_part():
        write_group()
        name = f"part-{len(parts):05d}.parquet"
        if state["file"] is not None:
            state["writer"].close()
            state["file"].__exit__(None, None, None)
        parts.append({"file": name, "rows": state["rows"], "sha256": _sha256(out / name)})
        state["file"] = state["writer"] = None
        state["rows"] = 0

    def open_part():
        name = f"part-{len(parts):05d}.parquet"
        if (out / name).exists():  # written completely before a crash (atomic): kept, not rewritten
            return
        state["file"] = AtomicFile(out, name)
        state["writer"] = pq.ParquetWriter(
            pa.PythonFile(state["file"].handle, mode="w"), _schema(fmt), compression="zstd"
        )

    try:
        for ex in reader:
            if state["rows"] == 0 and state["file"] is None:
                open_part()
            state["examples"].append(ex)
            state["columns"].append(decoded_columns(ex) if fmt == "decoded" else axolotl_columns(ex, k, temperature))
            state["positions"] += len(ex.input_ids)
            state["rows"] += 1
            if state["positions"] >= ROW_GROUP_POSITIONS:
                write_group()
            if state["rows"] == rows_per_file:
                close_part()
            if bar is not None:
                bar.update(1)
        if state["rows"] or not parts:
            if state["file"] is None and not parts and not (out / "part-00000.parquet").exists():
                open_part()
            close_part()
    except BaseException as exc:
        if state["file"] is not None:  # the part being written is discarded; the ones before stay
            state["file"].__exit__(type(exc), exc, None)
        raise
    finally:
        if bar is not None:
            bar.close()
    record = {**settings, "examples": total, "k": k, "files": parts}
    write_json_atomic(done, record)
    os.unlink(settings_file)
    return record


PART_NAME = re.compile(r"part-\d{5}\.parquet")


def _export_to_store(url: str, settings: dict, export, staging) -> dict:
    """`export(folder)` into the staging folder of `url` (resuming a partial export staged there by the same
    settings; one of other settings is discarded), then uploaded with `_export.json` last. The store holding
    this export complete: its record, nothing done; another export, or files an export does not write: refused."""
    from formats.remote_write import Remote, staging_dir, write_staged
    from formats.trust import loads

    remote = Remote(url)
    if DONE_NAME in remote.listing():
        raw = remote.files().read_bytes(DONE_NAME, max_bytes=64 << 20, listed_in="the export")
        record = loads(raw, f"{url}/{DONE_NAME}", max_bytes=64 << 20)
        if not isinstance(record, dict) or {key: record.get(key) for key in settings} != settings:
            raise InputError(f"{url} holds another export ({DONE_NAME}); give a new prefix")
        return record
    folder = staging_dir(url, staging)
    for name in (SETTINGS_NAME, DONE_NAME):  # staged by a run with other settings: not this export's
        path = folder / name
        if path.is_file() and {k: json.loads(path.read_text()).get(k) for k in settings} != settings:
            shutil.rmtree(folder)
            break
    return write_staged(url, export, last=DONE_NAME, staging=folder, allowed=PART_NAME.fullmatch)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
