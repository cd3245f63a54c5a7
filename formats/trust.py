"""The trust boundary: the only way kdcache opens a cache it did not just write.

A cache is an artifact people receive from strangers, so everything read from it is untrusted input.
Every reader (verify, inspect, merge, add-tokenizer, export, train, eval) opens a cache's files
through `CacheFiles` and parses its JSON with `loads`; docs/FORMAT.md ("Threat model") says what
that guarantees. In short:

- names: a file a manifest names must match SAFE_NAME (`[A-Za-z0-9_-][A-Za-z0-9._-]*`, which is all
  kdcache writes), so no decoding a transport applies (`%2e%2e%2f`, a backslash) makes it a path;
- files: only regular files are opened, never a symlink, FIFO, device or folder; a local file is
  opened with O_NOFOLLOW | O_NONBLOCK relative to its folder's descriptor and checked with fstat;
- sizes: a file must have the size its manifest records (or stay below a documented cap) before any
  byte of it is used, and reads never go past that size;
- hashes: a file's sha256 is computed from the bytes as they are read and compared before they are
  used (a shard: before its rows are decoded; over a network, the verified bytes are the ones parsed);
- JSON: `loads` bounds size, nesting, number length and container count, and refuses duplicate keys,
  NaN and Infinity;
- printing: `printable` escapes everything from a cache before it reaches a terminal;
- remote failures: a store or hub that cannot answer (offline, unreachable, no such repo or revision,
  a refused token) is one InputError naming the cause (formats/hub.py), never a missing file.

Writing is the other half: formats/safe_write.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import stat
import tempfile

import fsspec

from formats.errors import ChecksumError, FormatError, InputError, KDCacheError

SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
CHUNK = 8 << 20  # bytes hashed (and copied) at a time

# JSON bounds: far above anything kdcache writes, far below what would exhaust a machine.
MAX_JSON_DEPTH = 64  # a manifest nests ~5 deep (merged_from adds 3 per level of merging)
MAX_JSON_NUMBER_CHARS = 40  # 2**63 has 19 digits; a float's repr at most 24 characters
MAX_JSON_CONTAINERS = 1 << 21  # objects + arrays in one document (a manifest has ~1 per shard)


def printable(value, *, newlines: bool = False) -> str:
    """`value` as text safe for a terminal: control characters (ESC, CR, ...) and other unprintable
    characters become Python escapes; newlines too (one value never spans lines) unless `newlines`."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or (newlines and c == "\n") else c.encode("unicode_escape").decode("ascii") for c in text
    )


def check_name(name, field: str, where: str) -> str:
    """A file named in a manifest is a plain, safe file name in the cache folder (or URL prefix)."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        shown = printable(repr(name))[:120]
        raise FormatError(
            f"{where}: {field} {shown} points outside the cache folder or is not a plain file name "
            "(letters, digits, '.', '_' and '-': all kdcache writes); refusing to read it"
        )
    return name


# ---- strict JSON ------------------------------------------------------------------------------


def loads(raw: bytes | str, where: str, *, max_bytes: int, what: str | None = None, max_keys: int | None = None):
    """Parse untrusted JSON: at most `max_bytes`, UTF-8, nesting <= MAX_JSON_DEPTH, at most
    MAX_JSON_CONTAINERS objects and arrays, numbers of at most MAX_JSON_NUMBER_CHARS characters, no
    NaN/Infinity, no key twice in an object, and (given `max_keys`: a document of a bounded schema, such as
    the manifest) at most `max_keys` keys in any one object. FormatError naming `where` (and `what`, e.g.
    "meta") otherwise."""
    subject = f"{where}: {what} is" if what else f"{where}:"
    what = what or "the JSON"
    if len(raw) > max_bytes:
        raise FormatError(
            f"{where}: {what} of {len(raw)} bytes, more than the {max_bytes} it may hold; "
            "the file is damaged or hostile"
        )
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"{subject} not valid JSON: not UTF-8 ({exc})") from None
    containers = raw.count("{") + raw.count("[")  # an upper bound (brackets inside strings count too)
    if containers > MAX_JSON_CONTAINERS:
        raise FormatError(f"{where}: {what} holds {containers} objects/arrays, more than {MAX_JSON_CONTAINERS}")
    try:
        hook = _unique_keys if max_keys is None else (lambda pairs: _unique_keys(pairs, max_keys))
        value = json.loads(raw, object_pairs_hook=hook, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise FormatError(f"{where}: {what} nests deeper than this parser allows (> {MAX_JSON_DEPTH})") from None
    except _JSONRefused as exc:
        raise FormatError(f"{where}: {what}: {exc}") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise FormatError(f"{subject} not valid JSON ({printable(exc)})") from None
    _check_depth(value, where, what)
    return value


class _JSONRefused(ValueError):
    pass


def _unique_keys(pairs, max_keys: int | None = None):
    if max_keys is not None and len(pairs) > max_keys:
        raise _JSONRefused(f"an object of {len(pairs)} keys (at most {max_keys} here; the file is damaged or hostile)")
    out = {}
    for key, value in pairs:
        if key in out:
            raise _JSONRefused(
                f"key {printable(repr(key))[:80]} appears twice in one object (which one counts "
                "would depend on the parser)"
            )
        out[key] = value
    return out


def _int(text: str) -> int:
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise _JSONRefused(f"an integer of {len(text)} digits (at most {MAX_JSON_NUMBER_CHARS})")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise _JSONRefused(f"a number of {len(text)} characters (at most {MAX_JSON_NUMBER_CHARS})")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _JSONRefused(f"the number {text} overflows a float")
    return value


def _constant(text: str):
    raise _JSONRefused(f"{text} is not JSON (NaN and Infinity are not numbers a cache stores)")


def _check_depth(value, where: str, what: str) -> None:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise FormatError(f"{where}: {what} nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))


def load_json_file(path, *, max_bytes: int, what: str | None = None):
    """A local JSON file (a run's config or results: `kdcache report`, `eval`) parsed with `loads`,
    reading at most `max_bytes` of it."""
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    return loads(raw, str(path), max_bytes=max_bytes, what=what)


def exact_int(value) -> bool:
    """A JSON integer: not a bool (True == 1 in Python), not a float (1.0 == 1)."""
    return type(value) is int


# ---- files ------------------------------------------------------------------------------------


class CacheFiles:
    """A cache folder (local path or fsspec URL) whose files are opened only through this object.

    files = CacheFiles("s3://bucket/cache")
    raw = files.read_bytes("manifest.json", max_bytes=...)      # bounded, regular file only
    with files.open("part-00000.parquet", size=..., sha256=...) as f:
        f.verify()                                              # hash; then read verified bytes
    """

    def __init__(self, path, storage_options: dict | None = None):
        self.path = str(path)
        self.fs, root = fsspec.core.url_to_fs(self.path, **(storage_options or {}))
        self.root = root.rstrip("/") or root
        protocol = self.fs.protocol
        self.local = "file" in ({protocol} if isinstance(protocol, str) else set(protocol))

    def __str__(self) -> str:
        return self.path

    def where(self, *names: str) -> str:
        return posixpath.join(self.root, *names)

    def remote(self):
        """A context in which a remote store's failure (an unreachable hub or server, HF_HUB_OFFLINE, a
        repo or revision that does not exist, a refused token or permission) is one InputError naming the
        cause and this cache, instead of looking like a missing file ("no manifest.json")."""
        return _remote_errors(self.path)

    # -- what is there ---------------------------------------------------------------------------
    def kind(self, *names: str) -> str | None:
        """'file', 'dir', 'link', 'other' (FIFO, device, socket) or None (absent); never follows a link."""
        where = self.where(*names)
        if self.local:
            try:
                st = os.lstat(where)
            except FileNotFoundError:
                return None
            except NotADirectoryError:
                return None
            return (
                "link"
                if stat.S_ISLNK(st.st_mode)
                else "file"
                if stat.S_ISREG(st.st_mode)
                else "dir"
                if stat.S_ISDIR(st.st_mode)
                else "other"
            )
        with self.remote():
            try:
                info = self.fs.info(where)
            except FileNotFoundError as exc:
                if remote_failure(exc, self.path) is not None:  # not absent: the repo, revision or hub is
                    raise
                return None
        if info.get("islink"):
            return "link"
        return {"file": "file", "directory": "dir"}.get(info.get("type"), "other")

    def exists(self, *names: str) -> bool:
        return self.kind(*names) is not None

    def walk(self, under: str | None = None) -> list[tuple[str, str]]:
        """Every entry under the cache folder (or its subfolder `under`) as (path relative to that
        folder, kind), links not followed."""
        top_dir = self.where(under) if under else self.root
        out = []
        if self.local:
            for top, dirs, files in os.walk(top_dir, followlinks=False):
                rel = os.path.relpath(top, top_dir)
                for name in sorted(dirs) + sorted(files):
                    path = name if rel == "." else posixpath.join(rel.replace(os.sep, "/"), name)
                    out.append((path, self.kind(*([under] if under else []), path)))
            return out
        with self.remote():
            found = self.fs.find(top_dir, withdirs=True, detail=True)
        for full, info in sorted(found.items()):
            rel = posixpath.relpath(full.rstrip("/"), top_dir)
            if rel != ".":
                kind = (
                    "link"
                    if info.get("islink")
                    else {"file": "file", "directory": "dir"}.get(info.get("type"), "other")
                )
                out.append((rel, kind))
        return out

    def require_file(self, *names: str, size: int | None = None, listed_in: str = "the manifest") -> int:
        """The size of a regular file (FormatError when absent, a link or not a plain file; ChecksumError
        when `size` is given and differs). A store that reports no size returns -1."""
        where = self.where(*names)
        kind = self.kind(*names)
        if kind is None:
            raise FormatError(
                f"{printable(where)}: missing (listed in {listed_in}); restore the file or re-run the job that wrote it"
            )
        if kind != "file":
            raise FormatError(
                f"{printable(where)}: a {_KIND_TEXT[kind]}, not a plain file; a cache holds only "
                "plain files (restore the file from the source)"
            )
        if self.local:
            actual = os.lstat(where).st_size
        else:
            with self.remote():
                actual = self.fs.info(where).get("size")
        if actual is None:
            return -1
        if size is not None and actual != size:
            raise ChecksumError(
                f"{printable(where)}: {actual} bytes, the manifest says {size} (truncated or "
                "replaced); restore it from the source"
            )
        return actual

    # -- reading ---------------------------------------------------------------------------------
    def open(self, *names: str, size: int, sha256: str | None) -> "VerifiedFile":
        """A regular file of exactly `size` bytes, for reading (a file object pyarrow accepts); with
        `sha256`, `verify()` hashes it and from then on every read returns verified bytes."""
        self.require_file(*names, size=size)
        where = self.where(*names)
        if self.local:
            return VerifiedFile(where, _open_local(self.root, names), size, sha256, local=True)
        with self.remote():
            return VerifiedFile(where, self.fs.open(where, "rb"), size, sha256, local=False, remote=self.remote)

    def read_bytes(
        self,
        *names: str,
        max_bytes: int,
        size: int | None = None,
        sha256: str | None = None,
        listed_in: str = "the manifest",
    ) -> bytes:
        """A whole regular file, at most `max_bytes` (FormatError past it, read no further), of the given
        size and sha256 when those are given (ChecksumError)."""
        actual = self.require_file(*names, size=size, listed_in=listed_in)
        where = self.where(*names)
        if actual > max_bytes:
            raise FormatError(
                f"{printable(where)}: {actual} bytes, more than the {max_bytes} such a file may hold; "
                "the file is damaged or hostile"
            )
        if self.local:
            with os.fdopen(_open_local(self.root, names), "rb") as f:
                data = f.read(max_bytes + 1)
        else:
            with self.remote(), self.fs.open(where, "rb") as f:
                data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise FormatError(
                f"{printable(where)}: more than the {max_bytes} bytes such a file may hold; "
                "the file is damaged or hostile"
            )
        if size is not None and len(data) != size:
            raise ChecksumError(f"{printable(where)}: {len(data)} bytes read, the manifest says {size}; restore it")
        if sha256 is not None:
            check_digest(hashlib.sha256(data).hexdigest(), sha256, where)
        return data

    def copy_to(self, names: tuple[str, ...], out, *, size: int, sha256: str) -> None:
        """Copy a listed file into the open binary file `out`, hashing as it streams; ChecksumError (and
        the caller discards `out`) unless the bytes are exactly `size` long with that sha256."""
        with self.open(*names, size=size, sha256=sha256) as f:
            digest, n = hashlib.sha256(), 0
            while block := f.raw_read(CHUNK):
                n += len(block)
                if n > size:
                    break
                digest.update(block)
                out.write(block)
            if n != size:
                raise ChecksumError(f"{printable(f.where)}: {n} bytes read, the manifest says {size}; restore it")
            check_digest(digest.hexdigest(), sha256, f.where)


def remote_failure(exc: BaseException, path: str) -> str | None:
    """The cause of a failure to reach the remote cache at `path` (over hf://, formats.hub names the hub's
    causes; elsewhere a connection error is the store's), or None when `exc` is only a missing file."""
    from formats.hub import chain, hub_error_text, is_connection_error, is_hub_url

    if is_hub_url(path):
        return hub_error_text(exc)
    for e in chain(exc):
        if is_connection_error(e):
            return (
                f"cannot reach the store ({type(e).__name__}: {printable(e)[:160]}); check the URL, the endpoint "
                "and the network"
            )
    return None


@contextlib.contextmanager
def _remote_errors(path: str):
    try:
        yield
    except KDCacheError:
        raise
    except Exception as exc:
        cause = remote_failure(exc, path)
        if cause is None and isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            cause = (
                f"cannot be read ({type(exc).__name__}: {printable(exc)[:200]}); check the URL, credentials and network"
            )
        if cause is None:
            raise
        raise InputError(f"{printable(path)}: {cause}") from None


_KIND_TEXT = {"link": "symlink", "dir": "folder", "other": "FIFO, device or socket"}


def _open_local(root: str, names: tuple[str, ...]) -> int:
    """An fd of root/names... opened without following a link at any component below `root`, and
    without blocking (a FIFO); fstat must say a regular file."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            for name in names[:-1]:  # a folder below the cache folder that is a symlink: ELOOP / ENOTDIR
                nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
            file_fd = os.open(names[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except OSError as exc:
            raise FormatError(
                f"{printable(posixpath.join(root, *names))}: cannot be opened as a plain file in a real "
                f"folder ({exc.strerror}); a cache holds only plain files and folders"
            ) from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise FormatError(
            f"{printable(posixpath.join(root, *names))}: not a plain file; a cache holds only plain files"
        )
    os.set_blocking(file_fd, True)
    return file_fd


def check_digest(actual: str, expected: str, where: str) -> None:
    if actual != expected:
        raise ChecksumError(
            f"{printable(where)}: sha256 {actual[:16]}... differs from the manifest's "
            f"{expected[:16]}... (changed after the manifest was written, or corrupted); "
            "restore it from the source"
        )


class VerifiedFile:
    """A cache file for reading, of a known size. `verify()` streams it once through sha256; a remote
    file is spooled to an anonymous local temporary file as it streams, so the bytes parsed afterwards
    are exactly the bytes hashed (a server cannot answer a later range request with other bytes)."""

    def __init__(self, where: str, f, size: int, sha256: str | None, *, local: bool, remote=contextlib.nullcontext):
        self.where, self.size, self.sha256, self.local, self._remote = where, size, sha256, local, remote
        self._f = os.fdopen(f, "rb") if isinstance(f, int) else f
        self.verified = sha256 is None

    def verify(self) -> None:
        if self.verified:
            return
        digest, n = hashlib.sha256(), 0
        if self.local:
            fd = self._f.fileno()
            while n < self.size and (block := os.pread(fd, min(CHUNK, self.size - n), n)):
                digest.update(block)
                n += len(block)
            extra = os.pread(fd, 1, n)
            if n != self.size or extra:
                raise ChecksumError(f"{printable(self.where)}: its size changed while it was read; restore it")
        else:
            spool = tempfile.TemporaryFile(prefix="kdcache-shard-")
            with self._remote():
                self._f.seek(0)
                while block := self._f.read(CHUNK):
                    n += len(block)
                    if n > self.size:
                        break
                    digest.update(block)
                    spool.write(block)
            if n != self.size:
                spool.close()
                raise ChecksumError(f"{printable(self.where)}: {n} bytes or more read, the manifest says {self.size}")
            self._f.close()
            spool.seek(0)
            self._f = spool
        check_digest(digest.hexdigest(), self.sha256, self.where)
        self.verified = True

    # the file protocol pyarrow uses; reads never go past the recorded size
    def raw_read(self, n: int) -> bytes:
        return self._f.read(n)

    def read(self, n: int = -1) -> bytes:
        left = self.size - self._f.tell()
        return self._f.read(left if n is None or n < 0 else max(0, min(n, left)))

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            return self._f.seek(self.size + offset)
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
