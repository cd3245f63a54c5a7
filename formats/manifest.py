"""The manifest: a cache's provenance, settings, counts and per-shard checksums (JSON, versioned).

It is written last and atomically, so its presence means the cache is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import sys
import time
from pathlib import Path

import fsspec

from formats.codec import MAX_TOKEN_ID, CodecConfig
from formats.errors import ChecksumError, FormatError
from formats.schema import FORMAT_VERSION, MANIFEST_NAME, check_version

REQUIRED = ["format_version", "codec", "shards", "counts"]


def sha256_file(path, fs=None, chunk: int = 8 << 20) -> str:
    """sha256 of a file, read in chunks; `fs` is an fsspec filesystem (default: the local one)."""
    fs = fs or fsspec.filesystem("file")
    h = hashlib.sha256()
    with fs.open(str(path), "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_file_bytes(fs, where: str, size: int, sha256: str) -> None:
    """The file at `where` has the size and sha256 its manifest recorded (FormatError when missing,
    ChecksumError when it differs). The size is compared first, so a file larger than recorded is
    refused before it is read."""
    if not fs.exists(where):
        raise FormatError(f"{where}: missing (listed in {MANIFEST_NAME}); restore the file or re-run the job that wrote it")
    actual = fs.size(where)
    if actual is not None and actual != size:  # None: the server does not say (the sha256 below still decides)
        raise ChecksumError(f"{where}: {actual} bytes, the manifest says {size} (truncated or replaced); "
                            "restore it from the source")
    digest = sha256_file(where, fs)
    if digest != sha256:
        raise ChecksumError(f"{where}: sha256 {digest[:16]}... differs from the manifest's {sha256[:16]}... "
                            "(corrupted); restore it from the source")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""


def open_cache(path: str | os.PathLike, storage_options: dict | None = None):
    """(filesystem, root path) for a local folder or an fsspec URL (s3://, gs://, hf://, memory://).

    storage_options go to the fsspec filesystem (e.g. {"endpoint_url": ...} for an S3-compatible store).
    """
    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    return fs, root.rstrip("/")


def load_manifest(path: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """Read and check a cache's manifest.json (see check_manifest): a hostile or damaged manifest
    is a FormatError naming the field, never a KeyError or TypeError later."""
    fs, root = open_cache(path, storage_options)
    mpath = posixpath.join(root, MANIFEST_NAME)
    if not fs.exists(mpath):
        partial = fs.exists(posixpath.join(root, "_progress"))
        hint = ("the job that writes it has not finished: rerun the same command to resume it"
                if partial else "is this a kdcache cache folder?")
        raise FormatError(f"{path}: no {MANIFEST_NAME} ({hint})")
    with fs.open(mpath, "rb") as f:  # read at most the bound (a server need not say the size)
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{mpath}: more than a manifest can hold ({MAX_MANIFEST_BYTES} bytes); "
                          "the manifest is damaged — restore it from the source")
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{mpath}: not valid JSON ({exc}); the manifest is damaged — restore it from the source") from None
    check_manifest(manifest, mpath)
    return manifest


def manifest_get(manifest: dict, path: tuple):
    """manifest[path[0]][path[1]]...; None where a key is missing or a value on the way is not an object."""
    value = manifest
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def reason_code(reason: str) -> str:
    """A reject's reason code: its text before the first ':' (counts.rejects_by_reason is keyed by it)."""
    return reason.split(":")[0]


def tally_reasons(rejects: list[dict]) -> dict[str, int]:
    """counts.rejects_by_reason of a list of rejects."""
    tally: dict[str, int] = {}
    for r in rejects:
        code = reason_code(r["reason"])
        tally[code] = tally.get(code, 0) + 1
    return tally


# Bounds on values a manifest can hold: anything beyond them is damage, and must not become an allocation.
MAX_MANIFEST_BYTES = 256 << 20
MAX_COUNT = 2**53      # counts, rows, positions, bytes (JSON-safe integers)
SIZE_FIELDS = (("tokenizer", "vocab_size"), ("teacher", "output_size"))
COUNT_FIELDS = ("examples", "positions", "rejects", "bytes", "inputs")
MAX_TOKENIZER_FILES = 64              # tokenizer.save_pretrained writes 2-6 files
MAX_TOKENIZER_FILE_BYTES = 512 << 20  # Gemma 3's tokenizer.json, among the largest, is about 33 MB


def teacher_output_size(manifest: dict) -> int | None:
    """Token ids a cache's teacher can emit: its output layer's rows (`teacher.output_size`, which
    can exceed the tokenizer's vocabulary: padded LM heads); caches written before that field was
    recorded fall back to `tokenizer.vocab_size`. None when neither is recorded."""
    return (manifest.get("teacher") or {}).get("output_size") or (manifest.get("tokenizer") or {}).get("vocab_size")


def id_limits(manifest: dict) -> dict:
    """{"topk": (bound, text), "input": (bound, text)}: exclusive bounds on the teacher's ids and on
    input_ids (a tokenizer's, or in generate mode sampled by the teacher), and how to name them in
    a message; bound None when the manifest records no size."""
    out, vocab = (manifest.get("teacher") or {}).get("output_size"), (manifest.get("tokenizer") or {}).get("vocab_size")
    topk = (teacher_output_size(manifest), f"the teacher's output size {out} (teacher.output_size)" if out else
            f"the vocab size {vocab} (tokenizer.vocab_size; the manifest records no teacher.output_size)")
    known = max([v for v in (out, vocab) if v], default=None)
    return {"topk": topk, "input": (known, f"{known} (the larger of teacher.output_size and tokenizer.vocab_size)")}


def check_accounting(manifest: dict, where: str) -> None:
    """Every input is written or rejected: counts.examples + counts.rejects == counts.inputs (when recorded)."""
    counts = manifest.get("counts") or {}
    rejects_file = manifest.get("rejects_file") or {}
    if "count" in rejects_file and rejects_file["count"] != counts.get("rejects"):
        raise FormatError(f"{where}: rejects_file.count {rejects_file['count']} != counts.rejects {counts.get('rejects')}")
    if counts.get("inputs") is None:
        return
    if counts.get("examples", 0) + counts.get("rejects", 0) != counts["inputs"]:
        raise FormatError(f"{where}: {counts.get('examples')} examples + {counts.get('rejects')} rejects != "
                          f"{counts['inputs']} inputs (counts.inputs): the cache does not account for every input")


def check_manifest(manifest, where: str) -> None:
    """Types and bounds of every manifest value kdcache uses; each path a plain name inside the cache.

    Raises FormatError naming the field. Duplicate shard entries (the same file, or the same
    sha256 under two names) are refused here: they would make a reader yield rows twice.
    """
    if not isinstance(manifest, dict):
        raise FormatError(f"{where}: not a JSON object (a manifest is {{\"format_version\": ..., \"shards\": [...]}})")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise FormatError(f"{where}: missing keys {missing}")
    check_version(manifest["format_version"], where)
    codec = CodecConfig.from_dict(manifest["codec"], f"{where}: codec")
    if manifest.get("k", codec.k) != codec.k:
        raise FormatError(f"{where}: k is {manifest['k']!r} but codec.k is {codec.k}")
    for key in ("teacher", "tokenizer", "dataset", "extra", "counts"):
        if not isinstance(manifest.get(key, {}), dict):
            raise FormatError(f"{where}: {key} must be a JSON object, got {type(manifest[key]).__name__}")
    for section, key in SIZE_FIELDS:
        value = (manifest.get(section) or {}).get(key)
        if value is not None:
            check_int(value, f"{where}: {section}.{key}", 1, MAX_TOKEN_ID)
    for key in COUNT_FIELDS:
        if key in manifest["counts"]:
            check_int(manifest["counts"][key], f"{where}: counts.{key}", 0, MAX_COUNT)
    per_position = manifest["counts"].get("bytes_per_position", 0)
    if isinstance(per_position, bool) or not isinstance(per_position, (int, float)):
        raise FormatError(f"{where}: counts.bytes_per_position is {per_position!r}, must be a number")
    by_reason = manifest["counts"].get("rejects_by_reason", {})
    if not isinstance(by_reason, dict) or not all(isinstance(n, int) for n in by_reason.values()):
        raise FormatError(f"{where}: counts.rejects_by_reason must map reasons to integers")
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise FormatError(f"{where}: shards must be a list of objects, got {type(shards).__name__}")
    names: dict[str, int] = {}
    digests: dict[str, int] = {}
    for i, shard in enumerate(shards):
        field = f"shards[{i}]"
        if not isinstance(shard, dict):
            raise FormatError(f"{where}: {field} must be an object with file, rows, positions, bytes, sha256")
        check_file_name(shard.get("file"), f"{field}.file", where)
        for key in ("rows", "positions", "bytes"):
            check_int(shard.get(key), f"{where}: {field}.{key}", 0, MAX_COUNT)
        check_sha256(shard.get("sha256"), f"{where}: {field}.sha256")
        for seen, key, what in ((names, "file", "listed twice"), (digests, "sha256", "the same sha256")):
            if shard[key] in seen:
                j = seen[shard[key]]
                raise FormatError(f"{where}: shards[{j}] ({shards[j]['file']}) and {field} ({shard['file']}): {what}, "
                                  "so their rows would be read twice; remove the duplicate entry (and file)")
            seen[shard[key]] = i
    rejects = manifest.get("rejects_file")
    if rejects is not None:
        if not isinstance(rejects, dict):
            raise FormatError(f"{where}: rejects_file must be an object with file, count, sha256")
        check_file_name(rejects.get("file"), "rejects_file.file", where)
        check_int(rejects.get("count"), f"{where}: rejects_file.count", 0, MAX_COUNT)
        check_sha256(rejects.get("sha256"), f"{where}: rejects_file.sha256")
    check_tokenizer_files(manifest.get("tokenizer_files"), where)


def check_tokenizer_files(entries, where: str) -> None:
    """`tokenizer_files` (absent in caches written before it): a list of {file, bytes, sha256}, each
    file a plain name (inside the cache's `tokenizer/` folder), listed once, of a bounded size."""
    if entries is None:
        return
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_TOKENIZER_FILES:
        raise FormatError(f"{where}: tokenizer_files must be a list of 1..{MAX_TOKENIZER_FILES} objects "
                          "{file, bytes, sha256}; the manifest is damaged")
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        field = f"tokenizer_files[{i}]"
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: {field} must be an object with file, bytes, sha256")
        check_file_name(entry.get("file"), f"{field}.file", where)
        check_int(entry.get("bytes"), f"{where}: {field}.bytes", 0, MAX_TOKENIZER_FILE_BYTES)
        check_sha256(entry.get("sha256"), f"{where}: {field}.sha256")
        if entry["file"] in seen:
            raise FormatError(f"{where}: {field}.file {entry['file']!r} is listed twice; the manifest is damaged")
        seen.add(entry["file"])


def check_int(value, where: str, lo: int, hi: int) -> int:
    """`value` as an int in lo..hi (JSON true/false and floats are not ints), else FormatError."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise FormatError(f"{where} is {value!r}: must be an integer in {lo}..{hi}; the manifest is damaged")
    return value


def check_sha256(value, where: str) -> None:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise FormatError(f"{where} is {value!r}: must be 64 lowercase hex digits; the manifest is damaged")


def check_file_name(name, field: str, where: str) -> None:
    """A file named in a manifest is a plain file name inside the cache folder (or URL prefix):
    no paths, no '..', no URL, no absolute path."""
    if (not isinstance(name, str) or not name or any(c in name for c in "/\\:\0")
            or name in (".", "..") or name.startswith("..")):
        raise FormatError(f"{where}: {field} {name!r} points outside the cache folder (a file in the manifest must be "
                          "a plain file name in the cache folder); refusing to read it")


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_manifest(codec: dict, provenance: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "created": now_iso(),
        "command": provenance.get("command") or command_line(),
        "codec": codec,
        "k": codec["k"],
        "mode": provenance.get("mode", "score"),
        "teacher": provenance.get("teacher", {}),
        "tokenizer": provenance.get("tokenizer", {}),
        "dataset": provenance.get("dataset", {}),
        "extra": {k: v for k, v in provenance.items() if k not in ("command", "mode", "teacher", "tokenizer", "dataset")},
        "counts": {},
        "shards": [],
    }
