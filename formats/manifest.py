"""The manifest: a cache's provenance, settings, counts and per-shard checksums (JSON, versioned).

It is written last and atomically, so its presence means the cache is complete.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from pathlib import Path

from formats.codec import MAX_TOKEN_ID, CodecConfig
from formats.errors import FormatError
from formats.schema import CARD_NAME, MANIFEST_NAME, SHARD_SUFFIX, check_codec_version, check_version
from formats.tokenizer_id import fingerprint_version
from formats.trust import CacheFiles, check_name, exact_int, loads, printable

REQUIRED = ["format_version", "codec", "shards", "counts"]


def sha256_file(path, chunk: int = 8 << 20) -> str:
    """sha256 of a local file kdcache itself wrote (a cache's files are hashed by formats.trust as read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""


def open_cache(path, storage_options: dict | None = None) -> CacheFiles:
    """The cache at a local folder or fsspec URL (s3://, gs://, hf://, memory://, https://), whose files are
    read only through the returned formats.trust.CacheFiles. storage_options go to the fsspec filesystem
    (e.g. {"endpoint_url": ...} for an S3-compatible store). A CacheFiles is returned as it is."""
    if isinstance(path, CacheFiles):
        return path
    return CacheFiles(path, storage_options)


def load_manifest(path, storage_options: dict | None = None) -> dict:
    """Read and check a cache's manifest.json (strict JSON, see check_manifest): a hostile or damaged
    manifest is a FormatError naming the field, never a KeyError or TypeError later."""
    files = open_cache(path, storage_options)
    mpath = files.where(MANIFEST_NAME)
    if not files.exists(MANIFEST_NAME):
        partial = files.exists("_progress")
        hint = (
            "the job that writes it has not finished: rerun the same command to resume it"
            if partial
            else "is this a kdcache cache folder?"
        )
        raise FormatError(f"{printable(files.path)}: no {MANIFEST_NAME} ({hint})")
    raw = files.read_bytes(MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES, listed_in="the cache")
    manifest = loads(raw, mpath, max_bytes=MAX_MANIFEST_BYTES, what="the manifest", max_keys=MAX_MANIFEST_OBJECT_KEYS)
    check_manifest(manifest, printable(mpath))
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
MAX_MANIFEST_BYTES = 64 << 20  # a manifest of 100k shards is ~20 MB
# keys in any one object of a manifest (its schema has a few dozen; rejects_by_reason one per reason code):
# a million junk keys would otherwise be parsed, checked, carried into a merge and re-encoded, seconds each
MAX_MANIFEST_OBJECT_KEYS = 4096
MAX_COUNT = 2**53  # counts, rows, positions, bytes (JSON-safe integers)
SIZE_FIELDS = (("tokenizer", "vocab_size"), ("teacher", "output_size"))
COUNT_FIELDS = ("examples", "positions", "rejects", "bytes", "inputs")
MAX_TOKENIZER_FILES = 64  # tokenizer.save_pretrained writes 2-6 files
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
    topk = (
        teacher_output_size(manifest),
        f"the teacher's output size {out} (teacher.output_size)"
        if out
        else f"the vocab size {vocab} (tokenizer.vocab_size; the manifest records no teacher.output_size)",
    )
    known = max([v for v in (out, vocab) if v], default=None)
    return {"topk": topk, "input": (known, f"{known} (the larger of teacher.output_size and tokenizer.vocab_size)")}


def check_accounting(manifest: dict, where: str) -> None:
    """Every input is written or rejected: counts.examples + counts.rejects == counts.inputs (when recorded)."""
    counts = manifest.get("counts") or {}
    rejects_file = manifest.get("rejects_file") or {}
    if "count" in rejects_file and rejects_file["count"] != counts.get("rejects"):
        raise FormatError(
            f"{where}: rejects_file.count {rejects_file['count']} != counts.rejects {counts.get('rejects')}"
        )
    if counts.get("inputs") is None:
        return
    if counts.get("examples", 0) + counts.get("rejects", 0) != counts["inputs"]:
        raise FormatError(
            f"{where}: {counts.get('examples')} examples + {counts.get('rejects')} rejects != "
            f"{counts['inputs']} inputs (counts.inputs): the cache does not account for every input"
        )


def check_manifest(manifest, where: str) -> None:
    """Types and bounds of every manifest value kdcache uses; each path a plain name inside the cache.

    Raises FormatError naming the field. Duplicate shard entries (the same file, or the same
    sha256 under two names) are refused here: they would make a reader yield rows twice.
    """
    if not isinstance(manifest, dict):
        raise FormatError(f'{where}: not a JSON object (a manifest is {{"format_version": ..., "shards": [...]}})')
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise FormatError(f"{where}: missing keys {missing}")
    check_version(manifest["format_version"], where)
    codec = CodecConfig.from_dict(manifest["codec"], f"{where}: codec")
    check_codec_version(manifest["format_version"], codec, where)
    if "k" in manifest and not (exact_int(manifest["k"]) and manifest["k"] == codec.k):
        raise FormatError(f"{where}: k is {printable(repr(manifest['k']))} but codec.k is {codec.k}")
    if manifest.get("mode", "score") not in MODES:
        raise FormatError(f"{where}: mode is {printable(repr(manifest['mode']))}, must be one of {MODES}")
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
    if not isinstance(by_reason, dict) or not all(exact_int(n) and 0 <= n <= MAX_COUNT for n in by_reason.values()):
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
        check_name(shard.get("file"), f"{field}.file", where)
        if not shard["file"].endswith(SHARD_SUFFIX):
            raise FormatError(
                f"{where}: {field}.file {printable(shard['file'])!r} must end with {SHARD_SUFFIX} "
                "(what the cache's card and ordinary Parquet tools load)"
            )
        for key in ("rows", "positions", "bytes"):
            check_int(shard.get(key), f"{where}: {field}.{key}", 0, MAX_COUNT)
        check_sha256(shard.get("sha256"), f"{where}: {field}.sha256")
        for seen, key, what in ((names, "file", "listed twice"), (digests, "sha256", "the same sha256")):
            if shard[key] in seen:
                j = seen[shard[key]]
                raise FormatError(
                    f"{where}: shards[{j}] ({shards[j]['file']}) and {field} ({shard['file']}): {what}, "
                    "so their rows would be read twice; remove the duplicate entry (and file)"
                )
            seen[shard[key]] = i
    rejects = manifest.get("rejects_file")
    if rejects is not None:
        if not isinstance(rejects, dict):
            raise FormatError(f"{where}: rejects_file must be an object with file, count, sha256")
        check_name(rejects.get("file"), "rejects_file.file", where)
        if rejects["file"].endswith(SHARD_SUFFIX) or rejects["file"] in (MANIFEST_NAME, CARD_NAME):
            raise FormatError(f"{where}: rejects_file.file {rejects['file']!r} names a shard, the manifest or the card")
        check_int(rejects.get("count"), f"{where}: rejects_file.count", 0, MAX_COUNT)
        check_sha256(rejects.get("sha256"), f"{where}: rejects_file.sha256")
    check_tokenizer_files(manifest.get("tokenizer_files"), where)
    check_provenance(manifest, where)
    row_limits(manifest, where)
    check_accounting(manifest, where)
    try:
        fingerprint_version(manifest.get("tokenizer"))
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None
    counts = manifest["counts"]
    for key, total in (("examples", "rows"), ("positions", "positions"), ("bytes", "bytes")):
        listed = sum(s[total] for s in shards)
        if key in counts and counts[key] != listed:  # every reader relies on these (epoch sizes, progress)
            raise FormatError(
                f"{where}: the shards list {listed} {key} (shards[].{total}), counts.{key} says "
                f"{counts[key]}; the manifest is damaged: restore it from the source"
            )


def check_tokenizer_files(entries, where: str) -> None:
    """`tokenizer_files` (absent in caches written before it): a list of {file, bytes, sha256}, each
    file a plain name (inside the cache's `tokenizer/` folder), listed once, of a bounded size."""
    if entries is None:
        return
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_TOKENIZER_FILES:
        raise FormatError(
            f"{where}: tokenizer_files must be a list of 1..{MAX_TOKENIZER_FILES} objects "
            "{file, bytes, sha256}; the manifest is damaged"
        )
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        field = f"tokenizer_files[{i}]"
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: {field} must be an object with file, bytes, sha256")
        check_name(entry.get("file"), f"{field}.file", where)
        check_int(entry.get("bytes"), f"{where}: {field}.bytes", 0, MAX_TOKENIZER_FILE_BYTES)
        check_sha256(entry.get("sha256"), f"{where}: {field}.sha256")
        if entry["file"] in seen:
            raise FormatError(f"{where}: {field}.file {entry['file']!r} is listed twice; the manifest is damaged")
        seen.add(entry["file"])


# Provenance that names the teacher's weights, the dataset and the license exactly (absent from caches written
# before it was recorded, which load as they did). What the card shows of it is escaped there too.
MAX_TEXT = 1024  # a name, path, revision, config or version
MAX_WEIGHT_FILES = 10_000  # a sharded checkpoint has tens of files
MAX_LICENSES = 16
LICENSE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")  # an SPDX id or the hub's (odc-by, apache-2.0)


def license_ids_ok(value) -> bool:
    """A license as a card's `license` holds it: one id, or a list of 1..16 ids (SPDX or hub ids)."""
    ids = value if isinstance(value, list) and 1 <= len(value) <= MAX_LICENSES else [value]
    return all(isinstance(i, str) and LICENSE_ID.fullmatch(i) for i in ids)


def check_provenance(manifest: dict, where: str) -> None:
    """`teacher.revision`, `teacher.commit`, `teacher.weights_sha256`, `teacher.weight_files`, `dataset.revision`,
    `dataset.config`, `license` and `kdcache_version`: absent or null, or of their type and within bounds."""
    teacher, dataset = manifest.get("teacher") or {}, manifest.get("dataset") or {}
    for section, key, value in (
        ("teacher", "revision", teacher.get("revision")),
        ("teacher", "commit", teacher.get("commit")),
        ("dataset", "revision", dataset.get("revision")),
        ("dataset", "config", dataset.get("config")),
        ("", "kdcache_version", manifest.get("kdcache_version")),
    ):
        check_text(value, f"{where}: {section + '.' if section else ''}{key}")
    if teacher.get("weights_sha256") is not None:
        check_sha256(teacher["weights_sha256"], f"{where}: teacher.weights_sha256")
    files = teacher.get("weight_files")
    if files is not None:
        if not isinstance(files, dict) or not 1 <= len(files) <= MAX_WEIGHT_FILES:
            raise FormatError(
                f"{where}: teacher.weight_files must map 1..{MAX_WEIGHT_FILES} file names to sha256s; "
                "the manifest is damaged"
            )
        for name, digest in files.items():
            check_text(name, f"{where}: a teacher.weight_files name", max_chars=255)
            check_sha256(digest, f"{where}: teacher.weight_files[{printable(repr(name))[:80]}]")
    lic = manifest.get("license")
    if lic is None:
        return
    if not isinstance(lic, dict) or not (lic.get("id") is None or license_ids_ok(lic["id"])):
        raise FormatError(
            f'{where}: license is {printable(repr(lic))[:120]}: must be {{"id": an SPDX or hub license id '
            '(or a list of them) or null, "source": text or null}; the manifest is damaged'
        )
    check_text(lic.get("source"), f"{where}: license.source")


def check_text(value, where: str, max_chars: int = MAX_TEXT) -> None:
    """`value` null or a string of at most `max_chars` characters, else FormatError."""
    if value is not None and not (isinstance(value, str) and len(value) <= max_chars):
        raise FormatError(
            f"{where} is {printable(repr(value))[:80]}: must be text of at most {max_chars} characters or null; "
            "the manifest is damaged"
        )


def check_int(value, where: str, lo: int, hi: int) -> int:
    """`value` as an int in lo..hi (JSON true/false and floats are not ints), else FormatError."""
    if not exact_int(value) or not lo <= value <= hi:
        raise FormatError(
            f"{where} is {printable(repr(value))[:80]}: must be an integer in {lo}..{hi}; the manifest is damaged"
        )
    return value


def check_sha256(value, where: str) -> None:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise FormatError(
            f"{where} is {printable(repr(value))[:80]}: must be 64 lowercase hex digits; the manifest is damaged"
        )


def row_limits(manifest: dict, where: str = MANIFEST_NAME) -> dict:
    """What every row of a cache must satisfy, from its manifest (formats.shard.decode_table checks it):
    {"mode", "max_tokens" (None: not recorded), "finish_reasons" (allowed values of finish_reason),
    "ids" (id_limits)}.
    A score-mode row is at most extra.template.max_length tokens and has no finish_reason; a generated
    one adds at most extra.sampling.max_new_tokens and finished with "stop" or "length"."""
    mode = manifest.get("mode", "score")
    template = manifest_get(manifest, ("extra", "template"))
    sampling = manifest_get(manifest, ("extra", "sampling"))
    max_length = template.get("max_length") if isinstance(template, dict) else None
    new_tokens = sampling.get("max_new_tokens") if isinstance(sampling, dict) else None
    for value, name in ((max_length, "extra.template.max_length"), (new_tokens, "extra.sampling.max_new_tokens")):
        if value is not None:
            check_int(value, f"{where}: {name}", 1, MAX_TOKEN_ID)
    max_tokens = max_length
    if mode == "generate":
        max_tokens = None if max_length is None or new_tokens is None else max_length + new_tokens
    return {
        "mode": mode,
        "max_tokens": max_tokens,
        "finish_reasons": {None} if mode == "score" else {"stop", "length"},
        "ids": id_limits(manifest),
    }


MODES = ("score", "generate")


# Provenance keys kept at the top of the manifest; any other key of a writer's provenance goes under `extra`.
TOP_LEVEL = ("command", "mode", "teacher", "tokenizer", "dataset", "license", "kdcache_version")


def new_manifest(codec: dict, provenance: dict) -> dict:
    optional = {k: provenance[k] for k in ("license", "kdcache_version") if k in provenance}
    return {
        "format_version": CodecConfig.from_dict(codec).version,  # the codec's version is the format's
        "created": now_iso(),
        "command": provenance.get("command") or command_line(),
        "codec": codec,
        "k": codec["k"],
        "mode": provenance.get("mode", "score"),
        "teacher": provenance.get("teacher", {}),
        "tokenizer": provenance.get("tokenizer", {}),
        "dataset": provenance.get("dataset", {}),
        **optional,
        "extra": {k: v for k, v in provenance.items() if k not in TOP_LEVEL},
        "counts": {},
        "shards": [],
    }
