"""The teacher's tokenizer inside the cache: the files `tokenizer.save_pretrained` writes, in the
cache's `tokenizer/` folder, each listed in the manifest's `tokenizer_files` (file, bytes, sha256)
like the shards, so a student with another tokenizer can align its tokens to the teacher's without
downloading the teacher.

    entries = save_tokenizer_files(tokenizer, cache_dir)   # the cache job, before its manifest
    verify_tokenizer_files(fs, root, manifest)             # `kdcache verify`
    tokenizer = load_cache_tokenizer(cache)                # the trainer (verifies first)
    add_tokenizer(cache, "DIR_OR_HUB_ID")                  # `kdcache add-tokenizer`, for older caches

Every value read from a manifest is untrusted: names must be plain file names (check_manifest),
sizes are bounded, a symlink or a file the manifest does not list is refused. Transformers is
imported lazily.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from pathlib import Path

from formats.errors import FormatError, IncompatibleCachesError, InputError
from formats.manifest import (check_file_bytes, check_tokenizer_files, fsync_dir, load_manifest, open_cache,
                              sha256_file, write_json_atomic)
from formats.schema import MANIFEST_NAME

TOKENIZER_DIR = "tokenizer"
PARTIAL_DIR = ".tokenizer.partial"  # being written (not `*.tmp`: the writer unlinks those as files)


def add_tokenizer_command(cache, manifest: dict) -> str:
    """The command that adds the tokenizer files to a cache written before they were stored."""
    name = (manifest.get("tokenizer") or {}).get("name_or_path") or "DIR_OR_HUB_ID"
    return f"kdcache add-tokenizer {cache} --tokenizer {name}"


# ---- writing ----------------------------------------------------------------------------------

def save_tokenizer_files(tokenizer, cache_dir) -> list[dict]:
    """Write `tokenizer.save_pretrained` into `cache_dir/tokenizer/` (replacing what a killed job left
    there) and return the manifest's `tokenizer_files` entries. The folder is written under a hidden
    name, fsynced, then renamed into place; the caller writes the manifest after this returns."""
    root = Path(cache_dir)
    partial, final = root / PARTIAL_DIR, root / TOKENIZER_DIR
    for leftover in (partial, final):
        if leftover.is_symlink() or leftover.is_file():
            leftover.unlink()
        elif leftover.exists():
            shutil.rmtree(leftover)
    tokenizer.save_pretrained(str(partial))
    entries = []
    for path in sorted(partial.iterdir()):
        if path.is_symlink() or not path.is_file():
            raise InputError(f"{path}: tokenizer.save_pretrained wrote something other than a plain file; "
                             "kdcache stores only flat tokenizer folders")
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        entries.append({"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    check_tokenizer_files(entries, str(partial))  # the bounds every reader applies
    fsync_dir(partial)
    os.replace(partial, final)
    fsync_dir(root)
    return entries


def copy_tokenizer_files(cache, manifest: dict, out) -> list[dict]:
    """Copy a cache's tokenizer files into the new cache folder `out` (kdcache merge); the copies are
    verified against `manifest` (the source's) before the entries are returned for the new manifest."""
    fs, root = open_cache(cache)
    out = Path(out)
    partial = out / PARTIAL_DIR
    partial.mkdir()
    for entry in manifest["tokenizer_files"]:  # plain names (load_manifest checked them)
        fs.get(posixpath.join(root, TOKENIZER_DIR, entry["file"]), str(partial / entry["file"]))
    os.replace(partial, out / TOKENIZER_DIR)
    try:
        verify_tokenizer_files(*open_cache(out), manifest)
    except FormatError as exc:
        shutil.rmtree(out / TOKENIZER_DIR)
        raise FormatError(f"{cache}: its tokenizer files do not match its manifest ({exc}); run `kdcache verify {cache}`") from None
    return [dict(e) for e in manifest["tokenizer_files"]]


# ---- checking ---------------------------------------------------------------------------------

def verify_tokenizer_files(fs, root: str, manifest: dict) -> int:
    """The cache's `tokenizer/` folder holds exactly the files `tokenizer_files` lists, each of the
    recorded size and sha256, none a symlink (FormatError / ChecksumError naming the file). A cache
    without `tokenizer_files` must have no such folder. Returns the number of files checked."""
    entries = manifest.get("tokenizer_files")
    folder = posixpath.join(root, TOKENIZER_DIR)
    if entries is None:
        if fs.exists(folder):
            raise FormatError(f"{folder}: the manifest lists no tokenizer_files, yet the folder exists (left by an "
                              "interrupted `kdcache add-tokenizer`?); remove it, or run add-tokenizer again")
        return 0
    if not fs.exists(folder):
        raise FormatError(f"{folder}: missing (the manifest lists {len(entries)} tokenizer files); restore it, or "
                          "remove `tokenizer_files` from the manifest and run `kdcache add-tokenizer`")
    if _is_link(fs, folder) or not fs.isdir(folder):
        raise FormatError(f"{folder}: a symlink or not a folder; the tokenizer files must be plain files in the cache")
    listed = {e["file"] for e in entries}
    for info in fs.ls(folder, detail=True):
        name = posixpath.basename(info["name"].rstrip("/"))
        where = posixpath.join(folder, name)
        if name not in listed:
            raise FormatError(f"{where}: not listed in the manifest's tokenizer_files (an extra file); remove it")
        if info.get("islink") or info.get("type") != "file":
            raise FormatError(f"{where}: a symlink or not a plain file; the tokenizer files must be plain files in the cache")
    for entry in entries:
        check_file_bytes(fs, posixpath.join(folder, entry["file"]), entry["bytes"], entry["sha256"])
    return len(entries)


def _is_link(fs, path: str) -> bool:
    try:
        return bool(fs.info(path).get("islink"))
    except FileNotFoundError:
        return False


# ---- loading ----------------------------------------------------------------------------------

def load_cache_tokenizer(cache, storage_options: dict | None = None):
    """The teacher's tokenizer from the cache's own files: verified (sizes, sha256, no extra files),
    loaded with AutoTokenizer, and checked to have the manifest's fingerprint. A remote cache's files
    are copied to a temporary folder and verified there. A cache written before tokenizer files were
    stored gets an InputError with the `kdcache add-tokenizer` command that adds them."""
    manifest = load_manifest(cache, storage_options)
    if manifest.get("tokenizer_files") is None:
        raise InputError(f"{cache} carries no tokenizer files (it was written before caches stored the teacher's "
                         f"tokenizer); a student with another tokenizer needs them: `{add_tokenizer_command(cache, manifest)}`")
    fs, root = open_cache(cache, storage_options)
    if "file" in _protocols(fs):
        verify_tokenizer_files(fs, root, manifest)
        return _load_checked(posixpath.join(root, TOKENIZER_DIR), manifest, cache)
    with tempfile.TemporaryDirectory(prefix="kdcache-tokenizer-") as tmp:
        local = Path(tmp) / TOKENIZER_DIR
        local.mkdir()
        for entry in manifest["tokenizer_files"]:  # plain names (load_manifest checked them)
            fs.get(posixpath.join(root, TOKENIZER_DIR, entry["file"]), str(local / entry["file"]))
        local_fs, local_root = open_cache(tmp)
        verify_tokenizer_files(local_fs, local_root, manifest)
        return _load_checked(str(local), manifest, cache)


def _protocols(fs) -> set[str]:
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)


def _load_checked(folder: str, manifest: dict, cache):
    from transformers import AutoTokenizer

    from formats.tokenizer_id import tokenizer_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(folder)
    want = (manifest.get("tokenizer") or {}).get("fingerprint")
    if want and tokenizer_fingerprint(tokenizer) != want:
        raise FormatError(f"{cache}/{TOKENIZER_DIR}: the tokenizer these files load has another fingerprint than the "
                          "manifest's tokenizer.fingerprint; the files do not belong to this cache")
    return tokenizer


# ---- adding to an older cache -----------------------------------------------------------------

def add_tokenizer(cache, tokenizer_name: str) -> list[dict]:
    """Add the teacher's tokenizer files to a local cache written without them (`kdcache add-tokenizer`).

    The tokenizer must have the manifest's fingerprint (same tokens and special tokens) and chat
    template hash, else IncompatibleCachesError; a cache that already carries tokenizer files is left
    as it is (InputError). The files are written first, then the manifest, atomically."""
    from formats.card import write_card
    from formats.tokenizer_id import chat_template_sha256, load_tokenizer, tokenizer_fingerprint

    fs, root = open_cache(cache)
    if "file" not in _protocols(fs):
        raise InputError(f"{cache}: add-tokenizer writes into a local cache folder; download the cache, add the "
                         "tokenizer there, and upload the folder again")
    manifest = load_manifest(cache)
    if manifest.get("tokenizer_files") is not None:
        raise InputError(f"{cache} already carries its tokenizer files ({len(manifest['tokenizer_files'])} files); "
                         "`kdcache verify` checks them")
    recorded = manifest.get("tokenizer") or {}
    tokenizer = load_tokenizer(tokenizer_name)
    checks = [("fingerprint", tokenizer_fingerprint(tokenizer)), ("chat_template_sha256", chat_template_sha256(tokenizer))]
    for key, value in checks:
        if not recorded.get(key):
            raise IncompatibleCachesError(f"{cache}: the manifest records no tokenizer.{key}, so no tokenizer can be "
                                          "shown to be the one the cache was made with; re-create the cache")
        if value != recorded[key]:
            raise IncompatibleCachesError(
                f"{tokenizer_name} is not the tokenizer {cache} was made with: its {key} {value[:12]}... differs from "
                f"the manifest's tokenizer.{key} {recorded[key][:12]}... (made with {recorded.get('name_or_path')}); "
                "pass the teacher's own tokenizer")
    manifest["tokenizer_files"] = save_tokenizer_files(tokenizer, root)
    write_card(Path(root), manifest)
    write_json_atomic(Path(root) / MANIFEST_NAME, manifest)
    return manifest["tokenizer_files"]
