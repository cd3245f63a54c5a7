"""CacheWriter: rolling Parquet shards, atomic publish, resume after a crash, rejects accounting.

    with CacheWriter(out_dir, codec=CodecConfig(k=64), provenance={...}) as w:
        for record in records:
            if record_id in w.done_ids:      # written or rejected by an interrupted earlier run
                continue
            w.write(example)  # or w.reject(record_id, "reason")

Commit protocol of a shard: the Parquet file is written to a hidden temporary name and fsynced; a
sidecar `_progress/<shard>.json` (rows, ids, checksum, the rejects that came with those rows) is
written the same way; then both are renamed into place, the Parquet file first. On restart, a
shard counts only when both exist and the file's size and sha256 match; anything else is removed
and redone, under a name above every shard name the folder held (a redone shard never replaces a
kept one). `manifest.json` is written last, on exit without an exception: its presence means the
cache is complete.

Resuming (an unfinished job's `_progress/job.json`, or a finished cache's manifest) with settings
that change the rows (RESUME_KEYS) is refused with the settings that differ. When the caller sets
`inputs` (how many input records the job was given, times n in generate mode), finish() checks
`examples + rejects == inputs` and records `counts.inputs` (check_accounting checks it again).
"""

from __future__ import annotations

import json
import os
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from formats import codec as C
from formats.card import write_card
from formats.errors import FormatError, InputError
from formats.example import Example
from formats.manifest import load_manifest, new_manifest, sha256_file, tally_reasons, teacher_output_size
from formats.safe_write import LOCK_NAME, FolderLock, fsync_dir, write_json_atomic, write_text_atomic
from formats.schema import MANIFEST_NAME, REJECTS_NAME, SHARD_SUFFIX, arrow_schema, shard_key_value, shard_metadata
from formats.shard import check_example, encode_rows

PROGRESS = "_progress"
JOB = "job.json"
# Provenance that must match for a resumed job to continue an earlier one: every setting that changes
# the rows. Top-level manifest keys, else keys of the manifest's `extra` (cache_teacher.provenance.provenance
# puts the chat-template settings and generate mode's sampling settings there).
RESUME_KEYS = ("codec", "teacher", "tokenizer", "dataset", "mode", "template", "sampling")


@dataclass
class _OpenShard:
    writer: pq.ParquetWriter
    tmp: Path  # hidden name while writing
    name: str  # published name
    codes: C.IdCodes  # this shard's id codes (hot table from its first row group)
    meta: dict  # the shard's Parquet key-value metadata
    ids: list[str] = field(default_factory=list)
    positions: int = 0


class CacheWriter:
    """Writes one cache folder. Not thread-safe; one writer per folder (workers use their own)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        codec: C.CodecConfig = C.CodecConfig(),
        provenance: dict | None = None,
        vocab_size: int | None = None,
        output_size: int | None = None,
        shard_max_bytes: int = 256 << 20,
        row_group_positions: int = 65536,
        compression_level: int = 9,
        resume: bool = True,
        shard_prefix: str = "part",
    ):
        self.root = Path(path)
        self.codec = codec
        self.provenance = dict(provenance or {})
        if output_size:  # recorded as teacher.output_size (readers and the student check against it)
            self.provenance["teacher"] = {**self.provenance.get("teacher", {}), "output_size": output_size}
        self.vocab_size = vocab_size or self.provenance.get("tokenizer", {}).get("vocab_size")
        # Token ids the teacher can emit: its output layer's rows, which can exceed the tokenizer's
        # vocabulary (padded LM heads); ids are range-checked against it and it sets the id width.
        self.id_limit = teacher_output_size(
            {"teacher": self.provenance.get("teacher"), "tokenizer": {"vocab_size": self.vocab_size}}
        )
        for name, size in (("vocab_size", self.vocab_size), ("output_size", self.id_limit)):
            if size is not None and (
                isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= C.MAX_TOKEN_ID
            ):
                raise InputError(f"{name}={size!r} must be an integer in 1..{C.MAX_TOKEN_ID}")
        self.shard_max_bytes = shard_max_bytes
        self.row_group_positions = row_group_positions
        self.compression_level = compression_level
        self.shard_prefix = shard_prefix
        self.manifest = new_manifest(codec.to_dict(), self.provenance)
        self.done_ids: set[str] = set()
        self.complete = False
        self.inputs: int | None = None  # input records (x n in generate mode) the job was given; checked by finish()
        self._next_index = 0  # of the next shard name
        self._shards: list[dict] = []  # committed shards (sidecar contents)
        self._buffer: list[Example] = []
        self._buffer_positions = 0
        self._rejects: list[dict] = []  # not yet committed
        self._open: _OpenShard | None = None  # the shard being written
        self._lock = FolderLock(self.root)  # one job per folder: a second stops here, naming the first
        try:
            self._prepare(resume)
        except BaseException:
            self._lock.release()
            raise

    # ---- setup and resume ---------------------------------------------------------------------
    def _prepare(self, resume: bool) -> None:
        if (self.root / MANIFEST_NAME).exists():
            self._reopen_complete(resume)
            return
        progress = self.root / PROGRESS
        job_path = progress / JOB
        if progress.exists() and not resume:
            raise InputError(f"{self.root} holds an unfinished cache; resume it, or delete the folder to start over")
        if job_path.exists():
            refuse_other_settings(self.root, _read_json(job_path), self.manifest, "an unfinished cache")
        else:
            others = (
                sorted(p.name for p in self.root.iterdir() if p.name not in (PROGRESS, LOCK_NAME))
                if self.root.exists()
                else []
            )
            if others:
                raise InputError(
                    f"{self.root} is not empty ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) "
                    "and holds no kdcache job; write the cache to a new or empty folder"
                )
            progress.mkdir(parents=True, exist_ok=True)
            write_json_atomic(job_path, resume_settings(self.manifest))
        for tmp in {
            *self.root.glob("*.tmp"),
            *self.root.glob(".*.tmp"),
            *progress.glob("*.tmp"),
            *progress.glob("*.tmp2"),
        }:
            tmp.unlink()  # files being written when the job stopped
        sidecars = {p.name[: -len(".json")]: p for p in progress.glob(f"*{SHARD_SUFFIX}.json")}
        shards = sorted(self.root.glob(f"*{SHARD_SUFFIX}"))
        self._next_index = 1 + max(
            (self._shard_index(n) for n in [p.name for p in shards] + list(sidecars)), default=-1
        )
        for shard in shards:
            side = sidecars.pop(shard.name, None)
            info = _read_sidecar(side) if side else None
            if info is None or info["bytes"] != shard.stat().st_size or info["sha256"] != sha256_file(shard):
                shard.unlink()  # an interrupted publish: redo its rows
                if side:
                    side.unlink()
                continue
            self._shards.append(info)
            self.done_ids.update(info["ids"])
            self.done_ids.update(r["id"] for r in info["rejects"])
        for side in sidecars.values():  # sidecar without its shard
            side.unlink()
        pending = progress / "pending_rejects.jsonl"
        if pending.exists():  # rejects of records after the last shard: keep them (their ids are done)
            for r in _read_jsonl(pending):
                if r["id"] not in self.done_ids:
                    self._rejects.append(r)
                    self.done_ids.add(r["id"])

    def _reopen_complete(self, resume: bool) -> None:
        """A finished cache: nothing to write, but only when it was made with these settings."""
        if not resume:
            raise InputError(
                f"{self.root} already holds a complete cache; write to a new folder, or delete this one to start over"
            )
        manifest = load_manifest(self.root)
        refuse_other_settings(self.root, resume_settings(manifest), self.manifest, "a complete cache")
        self.manifest = manifest
        self.complete = True
        self.done_ids = {r["id"] for r in _read_jsonl(self.root / REJECTS_NAME)}
        self.done_ids |= self._ids_in_complete_cache()
        _rmtree(self.root / PROGRESS)  # left by a job killed after its manifest was written
        for tmp in {*self.root.glob("*.tmp"), *self.root.glob(".*.tmp")}:
            tmp.unlink()

    def _shard_index(self, name: str) -> int:
        """The number in `<prefix>-<number>.parquet`; -1 for other names."""
        number = name[len(self.shard_prefix) + 1 : -len(SHARD_SUFFIX)]
        return int(number) if name.startswith(self.shard_prefix + "-") and number.isdigit() else -1

    def _ids_in_complete_cache(self) -> set[str]:
        ids: set[str] = set()
        for shard in self.manifest["shards"]:
            ids.update(pq.read_table(self.root / shard["file"], columns=["id"]).column("id").to_pylist())
        return ids

    # ---- writing ----------------------------------------------------------------------------
    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            try:
                self._save_pending_rejects()  # keep what is accounted for; shards in flight are redone
            finally:
                self._lock.release()

    def write(self, example: Example) -> None:
        if self.complete:
            raise InputError(f"{self.root} is already complete; nothing more can be written to it")
        if example.id in self.done_ids:
            raise InputError(f"duplicate id {example.id!r}: every example id must be unique within a cache")
        check_example(example)
        self._check_id_range(example)
        self.done_ids.add(example.id)
        self._buffer.append(example)
        self._buffer_positions += max(1, example.num_targets)
        if self._buffer_positions >= self.row_group_positions:
            self._flush_row_group()

    def _check_id_range(self, example: Example) -> None:
        if self.id_limit is None or not example.num_targets:
            return
        too_big = example.topk_ids >= self.id_limit
        if too_big.any():
            row = int(np.nonzero(too_big)[0][0])
            size = (
                "the teacher's output size (teacher.output_size)"
                if self.provenance.get("teacher", {}).get("output_size")
                else "the vocab size (tokenizer.vocab_size; no teacher output size was given)"
            )
            raise InputError(
                f"example {example.id!r}, position {int(example.target_positions[row])}: token id "
                f"{int(example.topk_ids[too_big].max())} >= {size} {self.id_limit}; a teacher whose output layer is "
                "padded past the tokenizer emits such ids: give CacheWriter output_size= the number of rows of its "
                "LM head (config.vocab_size)"
            )

    def reject(self, record_id: str, reason: str, source: str = "") -> None:
        """Account for an input record that is not written (with a specific reason)."""
        if self.complete:
            raise InputError(f"{self.root} is already complete")
        record_id = str(record_id)
        if record_id in self.done_ids:
            return
        self.done_ids.add(record_id)
        self._rejects.append({"id": record_id, "reason": reason, "source": source})

    def _flush_row_group(self) -> None:
        if not self._buffer:
            return
        if self._open is None:
            self._open_shard()
        shard = self._open
        table = encode_rows(self._buffer, self.codec, shard.codes, shard.meta["id_bytes"], shard.meta)
        shard.writer.write_table(table, row_group_size=len(self._buffer))
        shard.ids.extend(ex.id for ex in self._buffer)
        shard.positions += sum(ex.num_targets for ex in self._buffer)
        self._buffer, self._buffer_positions = [], 0
        if shard.tmp.stat().st_size >= self.shard_max_bytes:
            self._close_shard()

    def _open_shard(self) -> None:
        name = f"{self.shard_prefix}-{self._next_index:05d}{SHARD_SUFFIX}"  # never a name already used here
        self._next_index += 1
        tmp = self.root / f".{name}.tmp"
        # The hot-id table comes from the shard's first row group: ids are Zipf-like and stable.
        hot = C.build_hot_table(
            np.concatenate([ex.topk_ids[:, : self.codec.k].ravel() for ex in self._buffer]), self.codec.hot
        )
        # The id width must fit every id any later row group can hold: without a known size, 4 bytes.
        max_id = self.id_limit - 1 if self.id_limit else C.MAX_TOKEN_ID
        id_bytes = C.code_bytes(max_id + len(hot))
        meta = shard_metadata(self.codec.to_dict(), id_bytes, hot)
        writer = pq.ParquetWriter(
            tmp,
            arrow_schema(id_bytes, version=self.codec.version),  # the kdcache key goes into the footer once, at close
            compression="zstd",
            compression_level=self.compression_level,
            use_dictionary=["id", "source", "finish_reason"],
            write_statistics=["id", "num_targets"],
        )
        self._open = _OpenShard(writer, tmp, name, C.IdCodes(hot), meta)

    def _close_shard(self) -> None:
        shard = self._open
        tmp, name, ids = shard.tmp, shard.name, shard.ids
        shard.writer.add_key_value_metadata(shard_key_value(shard.meta))
        shard.writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        info = {
            "file": name,
            "rows": len(ids),
            "positions": shard.positions,
            "bytes": tmp.stat().st_size,
            "sha256": sha256_file(tmp),
            "ids": ids,
            "rejects": self._rejects,
        }
        write_json_atomic(self.root / PROGRESS / f"{name}.json.tmp2", info)  # fsynced, hidden name
        os.replace(tmp, self.root / name)
        os.replace(self.root / PROGRESS / f"{name}.json.tmp2", self.root / PROGRESS / f"{name}.json")
        fsync_dir(self.root)
        self._shards.append(info)
        self._rejects = []
        (self.root / PROGRESS / "pending_rejects.jsonl").unlink(missing_ok=True)
        self._open = None

    def _save_pending_rejects(self) -> None:
        if self._rejects:
            path = self.root / PROGRESS / "pending_rejects.jsonl"
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self._rejects))
            os.replace(tmp, path)

    def finish(self) -> dict:
        """Flush, publish the last shard, write rejects, the dataset card and (last) the manifest."""
        if self.complete:
            self._lock.release(remove=True)
            return self.manifest
        self._flush_row_group()
        if self._open is not None:
            self._close_shard()
        rejects = [r for s in self._shards for r in s["rejects"]] + self._rejects
        _write_jsonl_atomic(self.root / REJECTS_NAME, rejects)
        by_reason = tally_reasons(rejects)
        examples = sum(s["rows"] for s in self._shards)
        if self.inputs is not None and examples + len(rejects) != self.inputs:
            raise InputError(
                f"{self.root}: {examples} examples + {len(rejects)} rejects != {self.inputs} inputs the job "
                "was given: some input was neither written nor rejected (a bug); the cache is left unfinished"
            )
        m = self.manifest
        m["shards"] = [{k: s[k] for k in ("file", "rows", "positions", "bytes", "sha256")} for s in self._shards]
        m["counts"] = {
            "examples": examples,
            "positions": sum(s["positions"] for s in self._shards),
            "rejects": len(rejects),
            "rejects_by_reason": by_reason,
            "bytes": sum(s["bytes"] for s in self._shards),
        }
        m["counts"]["bytes_per_position"] = m["counts"]["bytes"] / max(1, m["counts"]["positions"])
        if self.inputs is not None:
            m["counts"]["inputs"] = self.inputs
        m["rejects_file"] = {
            "file": REJECTS_NAME,
            "count": len(rejects),
            "sha256": sha256_file(self.root / REJECTS_NAME),
        }
        write_card(self.root, m)
        write_json_atomic(self.root / MANIFEST_NAME, m)
        _rmtree(self.root / PROGRESS)
        self.complete = True
        self._lock.release(remove=True)
        return m


def resume_settings(manifest: dict) -> dict:
    """The settings of RESUME_KEYS in a manifest (top-level key, else under `extra`)."""
    extra = manifest.get("extra") or {}
    return {k: manifest[k] if k in manifest else extra.get(k) for k in RESUME_KEYS}


def refuse_other_settings(root, old: dict, manifest: dict, what: str) -> None:
    """InputError naming every setting in which `old` (resume_settings of what `root` holds) differs from
    the settings of `manifest` (the job about to run)."""
    diff = settings_diff(old, resume_settings(manifest))
    if diff:
        raise InputError(
            f"{root} holds {what} made with other settings: {'; '.join(diff)} (was -> now). "
            "Rerun with the original settings to resume it, write to a new folder, or delete this one to start over"
        )


# Settings recorded only since a later kdcache (the teacher's weight hashes and resolved commit): a job or cache
# recorded without them (or where they could not be found) resumes; where both record them, they must agree.
RECORDED_LATER = ("teacher.weight_files", "teacher.weights_sha256", "teacher.commit")


def settings_diff(old: dict, new: dict) -> list[str]:
    """`key.sub: old -> new` for every leaf setting that differs (a RECORDED_LATER one only where `old` has it)."""
    a, b = _leaves(old), _leaves(new)
    return [
        f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}"
        for key in sorted(set(a) | set(b))
        if _canon(a.get(key)) != _canon(b.get(key)) and not (a.get(key) is None and _recorded_later(key))
    ]


def _recorded_later(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RECORDED_LATER)


def _leaves(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict) and obj:
        out = {}
        for key, value in obj.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist = 60, 60, 8


def _short(value) -> str:
    return _REPR.repr(value)


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc}); delete the folder to start over") from None


def _read_sidecar(path: Path) -> dict | None:
    """A shard's commit record, or None when it is unreadable (then the shard is redone)."""
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    keys = ("file", "rows", "positions", "bytes", "sha256", "ids", "rejects")
    return info if isinstance(info, dict) and all(k in info for k in keys) else None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as exc:
            raise FormatError(f"{path} line {lineno}: not valid JSON ({exc.msg}); the file is damaged") from None
        if row is not None:
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise FormatError(f'{path} line {lineno}: not a {{"id", "reason"}} record')
            rows.append(row)
    return rows


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _rmtree(path: Path) -> None:
    if not path.exists():
        return
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
