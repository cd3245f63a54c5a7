"""The teacher's tokenizer inside the cache: the files `tokenizer.save_pretrained` writes, in the
cache's `tokenizer/` folder, each listed in the manifest's `tokenizer_files` (file, bytes, sha256)
like the shards, so a student with another tokenizer can align its tokens to the teacher's without
downloading the teacher.

    entries = save_tokenizer_files(tokenizer, cache_dir)   # the cache job, before its manifest
    verify_tokenizer_files(cache, manifest)                # `kdcache verify`
    tokenizer = load_cache_tokenizer(cache)                # the trainer (verifies first)
    check_tokenizer_identity(cache, manifest)              # `kdcache verify`, after the file checks
    add_tokenizer(cache, "DIR_OR_HUB_ID")                  # `kdcache add-tokenizer`, for older caches

Every value read from a manifest is untrusted: names must be plain file names (check_manifest),
sizes are bounded, a symlink or a file the manifest does not list is refused. Transformers is
imported lazily.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from formats.errors import FormatError, IncompatibleCachesError, InputError
from formats.manifest import check_tokenizer_files, load_manifest, open_cache, sha256_file
from formats.safe_write import AtomicFile, fsync_dir, write_json_atomic
from formats.trust import printable
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
            raise InputError(
                f"{path}: tokenizer.save_pretrained wrote something other than a plain file; "
                "kdcache stores only flat tokenizer folders"
            )
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        entries.append({"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    check_tokenizer_files(entries, str(partial))  # the bounds every reader applies
    fsync_dir(partial)
    os.replace(partial, final)
    fsync_dir(root)
    return entries


def copy_tokenizer_files(cache, manifest: dict, out) -> list[dict]:
    """Copy a cache's tokenizer files into the new cache folder `out` (kdcache merge), each hashed as
    it streams against `manifest` (the source's) before the entries are returned for the new manifest."""
    files, out = open_cache(cache), Path(out)
    _check_folder(files, manifest["tokenizer_files"])
    partial = out / PARTIAL_DIR
    partial.mkdir()  # a new folder (merge writes into an empty one): nothing planted there to follow
    for entry in manifest["tokenizer_files"]:
        with AtomicFile(partial, entry["file"]) as f:
            files.copy_to((TOKENIZER_DIR, entry["file"]), f, size=entry["bytes"], sha256=entry["sha256"])
    os.replace(partial, out / TOKENIZER_DIR)
    fsync_dir(out)
    return [dict(e) for e in manifest["tokenizer_files"]]


# ---- checking ---------------------------------------------------------------------------------


def verify_tokenizer_files(cache, manifest: dict) -> int:
    """The cache's `tokenizer/` folder holds exactly the files `tokenizer_files` lists, each a plain
    file of the recorded size and sha256 (FormatError / ChecksumError naming the file). A cache
    without `tokenizer_files` must have no such folder. Returns the number of files checked."""
    files = open_cache(cache)
    entries = manifest.get("tokenizer_files")
    if entries is None:
        if files.exists(TOKENIZER_DIR):
            raise FormatError(
                f"{files.where(TOKENIZER_DIR)}: the manifest lists no tokenizer_files, yet the folder "
                "exists (left by an interrupted `kdcache add-tokenizer`?); remove it, or run add-tokenizer again"
            )
        return 0
    _check_folder(files, entries)
    for entry in entries:
        with files.open(TOKENIZER_DIR, entry["file"], size=entry["bytes"], sha256=entry["sha256"]) as f:
            f.verify()
    return len(entries)


def _check_folder(files, entries: list[dict]) -> None:
    """`tokenizer/` is a real folder holding plain files, each listed in `entries`."""
    folder = files.where(TOKENIZER_DIR)
    kind = files.kind(TOKENIZER_DIR)
    if kind is None:
        raise FormatError(
            f"{folder}: missing (the manifest lists {len(entries)} tokenizer files); restore it, or "
            "remove `tokenizer_files` from the manifest and run `kdcache add-tokenizer`"
        )
    if kind != "dir":
        raise FormatError(f"{folder}: a symlink or not a folder; the tokenizer files must be plain files in the cache")
    listed = {e["file"] for e in entries}
    for rel, kind in files.walk(TOKENIZER_DIR):
        where = printable(files.where(TOKENIZER_DIR, rel))
        if rel not in listed:
            raise FormatError(f"{where}: not listed in the manifest's tokenizer_files (an extra file); remove it")
        if kind != "file":
            raise FormatError(
                f"{where}: a symlink or not a plain file; the tokenizer files must be plain files in the cache"
            )


# ---- loading ----------------------------------------------------------------------------------


def load_cache_tokenizer(cache, storage_options: dict | None = None):
    """The teacher's tokenizer from the cache's own files: verified (sizes, sha256, no extra files),
    loaded with AutoTokenizer (a load error is a FormatError), and checked to be the manifest's
    tokenizer (fingerprint, chat-template hash, vocabulary size). A remote cache's files
    are copied to a temporary folder and verified there. A cache written before tokenizer files were
    stored gets an InputError with the `kdcache add-tokenizer` command that adds them."""
    files = open_cache(cache, storage_options)
    manifest = load_manifest(files)
    if manifest.get("tokenizer_files") is None:
        raise InputError(
            f"{cache} carries no tokenizer files (it was written before caches stored the teacher's "
            f"tokenizer); a student with another tokenizer needs them: `{add_tokenizer_command(cache, manifest)}`"
        )
    _check_folder(files, manifest["tokenizer_files"])
    # Loaded from a private copy of the verified bytes: what transformers parses is what was hashed.
    with tempfile.TemporaryDirectory(prefix="kdcache-tokenizer-") as tmp:
        for entry in manifest["tokenizer_files"]:
            with open(Path(tmp) / entry["file"], "xb") as f:
                files.copy_to((TOKENIZER_DIR, entry["file"]), f, size=entry["bytes"], sha256=entry["sha256"])
        return _load_checked(tmp, manifest, cache)


def check_tokenizer_identity(cache, manifest: dict, storage_options: dict | None = None) -> None:
    """`kdcache verify`, after the file checks: the tokenizer a cache's `tokenizer/` files load is the
    one its manifest records (fingerprint, chat-template hash, vocabulary size), so files whose sizes
    and sha256 were fixed up in the manifest are still refused (FormatError). It loads the tokenizer
    as `load_cache_tokenizer` does; a cache without `tokenizer_files` has nothing to check."""
    if manifest.get("tokenizer_files") is not None:
        load_cache_tokenizer(cache, storage_options)


def _identity_difference(field: str, tokenizer, entry: dict) -> str:
    """What the loaded tokenizer has instead of the manifest's `tokenizer.<field>`."""
    from formats.tokenizer_id import fingerprint_version

    if field == "fingerprint":
        covers = "vocabulary, special tokens" + (
            ", normalizer, pre-tokenizer, decoder, added tokens, merges" if fingerprint_version(entry) >= 2 else ""
        )
        return f"another fingerprint than tokenizer.fingerprint (v{fingerprint_version(entry)}: {covers})"
    if field == "chat_template_sha256":
        return "another chat template than tokenizer.chat_template_sha256"
    return f"{len(tokenizer.get_vocab())} tokens, not tokenizer.vocab_size {entry['vocab_size']}"


def _load_checked(folder: str, manifest: dict, cache):
    """Load the verified files and check the tokenizer is the manifest's (FormatError when not)."""
    from transformers import AutoTokenizer

    from formats.tokenizer_id import identity_differences

    where = f"{cache}/{TOKENIZER_DIR}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # tokenizers raises bare Exception for a bad tokenizer.json (a merge of unknown tokens)
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FormatError(
            f"{where}: the tokenizer files do not load ({type(exc).__name__}: {cause}); "
            "restore tokenizer/ from the source"
        ) from None
    entry = manifest.get("tokenizer") or {}
    differ = identity_differences(tokenizer, entry)
    if differ:
        raise FormatError(
            f"{where}: the tokenizer these files load has "
            f"{'; '.join(_identity_difference(field, tokenizer, entry) for field in differ)}: the files do not "
            "belong to this cache; restore tokenizer/ from the source"
        )
    return tokenizer


# ---- adding to an older cache -----------------------------------------------------------------


def add_tokenizer(cache, tokenizer_name: str) -> list[dict]:
    """Add the teacher's tokenizer files to a local cache written without them (`kdcache add-tokenizer`).

    The tokenizer must have the manifest's fingerprint (same tokens and special tokens) and chat
    template hash, else IncompatibleCachesError; a cache that already carries tokenizer files is left
    as it is (InputError). The files are written first, then the manifest, atomically."""
    from formats.card import write_card
    from formats.tokenizer_id import chat_template_sha256, load_tokenizer, manifest_fingerprint

    files = open_cache(cache)
    root = files.root
    if not files.local:
        raise InputError(
            f"{cache}: add-tokenizer writes into a local cache folder; download the cache, add the "
            "tokenizer there, and upload the folder again"
        )
    manifest = load_manifest(files)
    if manifest.get("tokenizer_files") is not None:
        raise InputError(
            f"{cache} already carries its tokenizer files ({len(manifest['tokenizer_files'])} files); "
            "`kdcache verify` checks them"
        )
    recorded = manifest.get("tokenizer") or {}
    tokenizer = load_tokenizer(tokenizer_name)
    checks = [
        ("fingerprint", manifest_fingerprint(tokenizer, recorded)),
        ("chat_template_sha256", chat_template_sha256(tokenizer)),
    ]
    for key, value in checks:
        if not recorded.get(key):
            raise IncompatibleCachesError(
                f"{cache}: the manifest records no tokenizer.{key}, so no tokenizer can be "
                "shown to be the one the cache was made with; re-create the cache"
            )
        if value != recorded[key]:
            raise IncompatibleCachesError(
                f"{tokenizer_name} is not the tokenizer {cache} was made with: its {key} {value[:12]}... differs from "
                f"the manifest's tokenizer.{key} {recorded[key][:12]}... (made with {recorded.get('name_or_path')}); "
                "pass the teacher's own tokenizer"
            )
    manifest["tokenizer_files"] = save_tokenizer_files(tokenizer, root)
    write_card(Path(root), manifest)
    write_json_atomic(Path(root) / MANIFEST_NAME, manifest)
    return manifest["tokenizer_files"]
