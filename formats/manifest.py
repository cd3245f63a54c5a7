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

from formats.errors import FormatError
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
    fs, root = open_cache(path, storage_options)
    mpath = posixpath.join(root, MANIFEST_NAME)
    if not fs.exists(mpath):
        partial = fs.exists(posixpath.join(root, "_progress"))
        hint = ("the job that writes it has not finished: rerun the same command to resume it"
                if partial else "is this a kdcache cache folder?")
        raise FormatError(f"{path}: no {MANIFEST_NAME} ({hint})")
    try:
        with fs.open(mpath, "r") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{mpath}: not valid JSON ({exc}); the manifest is damaged — restore it from the source") from None
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise FormatError(f"{mpath}: missing keys {missing}")
    check_version(manifest["format_version"], mpath)
    for shard in manifest["shards"]:
        check_shard_name(shard.get("file", ""), mpath)
    return manifest


def check_shard_name(name: str, where: str) -> None:
    """Shard names are plain file names inside the cache folder: no paths, no '..'."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("..") or ":" in name:
        raise FormatError(f"{where}: shard name {name!r} points outside the cache folder; refusing to read it")


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
