"""Writing a cache, a merge or an export straight to an object store (`--out s3://...`, `gs://`, any
writable fsspec URL): stage locally, upload each finished file as one object, the manifest last.

Why staging: the local writer's commit protocol (formats/writer.py: fsync, rename, folder descriptors)
needs a POSIX folder, and an object store offers one guarantee instead: a single PUT of a finished file
(a multipart or resumable upload included) makes the object appear complete or not at all. So every
file is first written and committed in a local staging folder by the unchanged local code (with its own
resume), and only a finished, committed file is uploaded, as one object; `manifest.json` (an export's
`_export.json`) is uploaded after every file it lists, so its presence on the store means complete.

Resume: a rerun lists the store and trusts an object only when it is listed, has the staged file's size
and its bytes hash (streamed) to the staged file's sha256; anything else is uploaded again. A cache job
also mirrors its `_progress/` files (the claim `job.json` first, then each shard followed by its sidecar),
so a rerun on a machine whose staging folder is gone restores the committed shards from the store and
the writer resumes from them (it re-checks every shard against its sidecar). Objects the finished cache
does not list (a shard uploaded before its sidecar, then redone; the mirrored `_progress/`) are removed
after the manifest.

Protocols: read-only ones (http(s), github, zip, ...) and chained URLs are refused, and a protocol
whose fsspec backend is not installed is named with the package to install, all before any work
starts (check_writable, called while the settings are validated). A `file://` URL is a local path.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import stat
import tempfile
import threading
from pathlib import Path

from formats.errors import FormatError, InputError
from formats.trust import CHUNK, SAFE_NAME, CacheFiles, loads, printable

# fsspec protocols that cannot store a file (or not one we can read back whole): refused as --out.
READ_ONLY = frozenset(
    {"http", "https", "github", "git", "zip", "tar", "libarchive", "reference", "data", "dbfs-ro", "ftp-ro"}
)
LOCAL = frozenset({"file", "local"})
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # pyproject.toml's extras that bring a backend
STAGING_ENV = "KDCACHE_STAGING"  # the folder staging folders go under (default: the system temp dir)
MAX_PROGRESS_BYTES = 256 << 20  # a mirrored _progress/ file restored from the store (ids of one shard)


def protocol_of(path) -> str | None:
    """The URL's protocol ("s3"), or None for a plain path."""
    text = str(path)
    return text.split("://", 1)[0].lower() if "://" in text else None


def is_remote(path) -> bool:
    """An fsspec URL that is not a local file (`file://` counts as local)."""
    return protocol_of(path) not in (None, *LOCAL)


def local_path(path) -> str:
    """A local path for `path` (`file:///x` -> `/x`); any other path as given."""
    text = str(path)
    return text.split("://", 1)[1] if protocol_of(text) in LOCAL else text


def check_writable(url: str, flag: str = "--out") -> None:
    """InputError (one line) unless kdcache can write a cache to `url`: no chained URL, a protocol fsspec
    knows, not a read-only one, its backend installed. Touches no network (it runs before any work)."""
    import fsspec
    from fsspec.registry import known_implementations, registry

    text = str(url)
    if "::" in text:
        raise InputError(
            f"{flag} {printable(text)}: a chained fsspec URL (caching layers) cannot be written to; "
            "give the store's own URL (e.g. s3://bucket/prefix)"
        )
    protocol = protocol_of(text)
    if protocol is None or protocol in LOCAL:
        return
    if protocol not in known_implementations and protocol not in registry:
        raise InputError(
            f"{flag} {printable(text)}: fsspec knows no protocol {protocol!r}; give a local folder or "
            "an object-store URL (s3://, gs://, az://, ...)"
        )
    if protocol in READ_ONLY:
        raise InputError(
            f"{flag} {printable(text)}: {protocol}:// is read-only (kdcache can read caches from it, "
            "not write them); write to a local folder or a writable store (s3://, gs://, az://)"
        )
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
        extra = f" (kdcache's [{EXTRAS[protocol]}] extra)" if protocol in EXTRAS else ""
        raise InputError(
            f"{flag} {printable(text)}: writing {protocol}:// needs the fsspec backend {package!r}, "
            f"which is not installed: pip install {package}{extra}"
        ) from None


def staging_dir(url: str, staging=None) -> Path:
    """The local folder a remote output is staged in: `staging` when given, else one named after the URL
    under $KDCACHE_STAGING (default: the system temp dir), so a rerun of the same command finds it."""
    if staging:
        return Path(staging).expanduser()
    base = Path(os.environ.get(STAGING_ENV) or tempfile.gettempdir()) / "kdcache-staging"
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(url).split("://", 1)[-1])[-80:]
    return base / f"{readable}-{hashlib.sha256(str(url).encode()).hexdigest()[:12]}"


def _fail(url: str, what: str, exc: BaseException) -> InputError:
    """A store's error (no credentials, no bucket, no permission) as one line naming the URL."""
    detail = printable(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)[:300]
    return InputError(
        f"{printable(url)}: cannot {what} ({type(exc).__name__}: {detail}); check the URL, the "
        "bucket and the credentials (for s3: AWS_* variables or ~/.aws; AWS_ENDPOINT_URL for others)"
    )


class Remote:
    """A folder-like prefix on an fsspec store that kdcache writes whole objects into."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec

        check_writable(url)
        self.url = str(url).rstrip("/")
        self.storage_options = storage_options
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/")

    def where(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def listing(self) -> dict[str, int | None]:
        """Every file under the prefix: relative name -> size (None where the store does not say); fresh
        (fsspec's listing cache is dropped first)."""
        try:
            self.fs.invalidate_cache()
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:
            raise _fail(self.url, "list", exc) from None
        out = {}
        for full, info in found.items():
            if info.get("type") == "file":
                out[posixpath.relpath(full.rstrip("/"), self.root)] = info.get("size")
        return out

    def sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        try:
            with self.fs.open(self.where(name), "rb") as f:
                while block := f.read(CHUNK):
                    digest.update(block)
        except Exception as exc:
            raise _fail(self.url, f"read {name}", exc) from None
        return digest.hexdigest()

    def holds(self, listing: dict, name: str, size: int, sha256: str) -> bool:
        """The object `name` is complete: listed, of `size` bytes, and its bytes hash to `sha256`."""
        return name in listing and listing[name] in (size, None) and self.sha256(name) == sha256

    def put(self, local: Path, name: str) -> None:
        """One object from a finished local file (a single PUT: it appears whole or not at all)."""
        try:
            self.fs.put_file(str(local), self.where(name))
        except Exception as exc:
            raise _fail(self.url, f"upload {name}", exc) from None

    def remove(self, names) -> None:
        for name in names:
            try:
                self.fs.rm_file(self.where(name))
            except FileNotFoundError:
                pass
            except Exception as exc:
                raise _fail(self.url, f"remove {name}", exc) from None
        self.fs.invalidate_cache()

    def files(self) -> CacheFiles:
        """The prefix for reading back through the trust boundary (bounded, hash-checked reads)."""
        return CacheFiles(self.url, self.storage_options)


def local_files(folder, skip=()) -> dict[str, Path]:
    """Every regular file under `folder` (relative '/'-joined name -> path), links not followed; each part
    of a name must be a plain name (formats.trust.SAFE_NAME), as everything kdcache writes is. Names in
    `skip` (a file or a folder's name) and hidden names are left out."""
    folder = Path(folder)
    out = {}
    for top, dirs, files in os.walk(folder, followlinks=False):
        rel = Path(top).relative_to(folder)
        dirs[:] = sorted(d for d in dirs if (rel / d).as_posix() not in skip)
        for name in sorted(files):
            relname = (rel / name).as_posix()
            path = Path(top) / name
            if relname in skip or name.startswith(".") or not stat.S_ISREG(os.lstat(path).st_mode):
                continue  # a hidden name is a temporary file of a write that never finished
            if not all(SAFE_NAME.fullmatch(part) for part in relname.split("/")):
                raise InputError(f"{printable(str(path))}: not a plain file name; kdcache uploads only plain names")
            out[relname] = path
    return out


def sha256_of(path) -> str:
    from formats.manifest import sha256_file

    return sha256_file(path)


def upload_files(
    remote: Remote, files: dict[str, Path], *, last: str | None, known: dict[str, str] | None = None
) -> list[str]:
    """Upload `files` (name -> local path) to `remote`, `last` after every other one; a name the store
    already holds complete (listed, same size and sha256) is skipped. `known`: name -> sha256 of objects
    this process uploaded itself (not hashed again). Returns the names uploaded."""
    listing = remote.listing()
    known = dict(known or {})
    uploaded = []
    for name in sorted(files, key=lambda n: (n == last, n)):
        path = files[name]
        digest = sha256_of(path)
        if known.get(name) == digest and name in listing:
            continue
        if remote.holds(listing, name, path.stat().st_size, digest):
            continue
        remote.put(path, name)
        uploaded.append(name)
    return uploaded


def upload_folder(remote: Remote, folder, *, last: str, skip=(), keep=()) -> list[str]:
    """Upload the finished folder `folder` to `remote` (upload_files, `last` last), then remove the objects
    under the prefix it does not hold (left by an earlier, interrupted run), except names in `keep`."""
    files = local_files(folder, skip)
    if last not in files:
        raise InputError(f"{printable(str(folder))}: no {last}; the staged output is not finished")
    uploaded = upload_files(remote, files, last=last)
    remote.remove(sorted(n for n in remote.listing() if n not in files and n not in keep))
    return uploaded


def refuse_foreign(remote: Remote, listing: dict, allowed) -> None:
    """InputError when the prefix holds files an output of this kind would never write (`allowed(name)`)."""
    others = sorted(n for n in listing if not allowed(n))
    if others:
        shown = ", ".join(printable(n) for n in others[:3]) + (", ..." if len(others) > 3 else "")
        raise InputError(
            f"{printable(remote.url)} is not empty ({shown}) and holds no kdcache output of this "
            "kind; write to a new or empty prefix"
        )


def write_staged(url: str, build, *, last: str, staging=None, storage_options=None, allowed=None):
    """Build a finished output in the local staging folder of `url` (`build(folder)`, which resumes from
    what an earlier run staged), upload it with `last` last (upload_folder), then drop the staging folder.
    `allowed(name)`: the names this output may find on the store before it starts (a partial upload of
    itself); anything else there is refused before `build` runs. Returns build's result."""
    remote = Remote(url, storage_options)
    refuse_foreign(remote, remote.listing(), allowed or (lambda name: True))
    folder = staging_dir(url, staging)
    result = build(folder)
    upload_folder(remote, folder, last=last)
    shutil.rmtree(folder, ignore_errors=True)
    return result


# ---- a cache job writing to a store ----------------------------------------------------------------


class CacheUpload:
    """`kdcache cache --out URL`: the staging folder the writer writes, mirrored to URL as the job goes.

    upload = CacheUpload(url)
    manifest = upload.open()       # the store's manifest when the cache there is complete, else None
    with CacheWriter(upload.staging, ...) as writer:
        upload.start()             # claim the prefix (job.json), then mirror committed shards in the background
        ...
    upload.stop()
    upload.finish()                # the rest, manifest.json last; staging removed
    """

    def __init__(self, url: str, staging=None, storage_options: dict | None = None, interval: float = 1.0):
        self.remote = Remote(url, storage_options)
        self.url = self.remote.url
        self.staging = staging_dir(url, staging)
        self.interval = interval
        self._sent: dict[str, str] = {}  # name -> sha256 of objects known complete on the store
        self._listing: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None  # the mirror's last failure (finish() retries every upload)
        self.complete: dict | None = None  # the store's manifest once open() found the cache complete there

    # -- before the job --------------------------------------------------------------------------
    def open(self) -> dict | None:
        """Check the store (before the teacher starts): complete -> its manifest; an unfinished job ->
        restore its committed shards into an empty staging folder; empty -> a new job; anything else is
        refused."""
        from formats.manifest import load_manifest
        from formats.schema import MANIFEST_NAME
        from formats.writer import JOB, PROGRESS

        self._listing = self.remote.listing()
        if MANIFEST_NAME in self._listing:
            self.complete = load_manifest(self.remote.files())
            return self.complete
        job = f"{PROGRESS}/{JOB}"
        if self._listing and job not in self._listing:
            refuse_foreign(self.remote, self._listing, lambda name: False)
        staged = (self.staging / PROGRESS / JOB).exists() or (self.staging / MANIFEST_NAME).exists()
        if job in self._listing and not staged:
            self._restore()
        return None

    def _restore(self) -> None:
        """The store's mirrored `_progress/` files and each shard a sidecar there names (size and sha256
        checked as it streams) into the staging folder; the writer then resumes as from a local folder. What
        comes from the store is untrusted: a sidecar that is not bounded strict JSON of the writer's kind, or
        whose shard is missing or differs, is not restored (the writer redoes its rows)."""
        from formats.safe_write import AtomicFile, make_folder
        from formats.schema import SHARD_SUFFIX
        from formats.writer import PROGRESS

        files = self.remote.files()
        make_folder(self.staging / PROGRESS)
        for name in sorted(self._listing):
            part = name.split("/")
            if len(part) != 2 or part[0] != PROGRESS or not SAFE_NAME.fullmatch(part[1]):
                continue
            sidecar = part[1].endswith(f"{SHARD_SUFFIX}.json")
            try:
                raw = files.read_bytes(PROGRESS, part[1], max_bytes=MAX_PROGRESS_BYTES, listed_in="the job's progress")
            except FormatError:
                if sidecar:
                    continue
                raise  # job.json or the pending rejects: the job cannot go on without knowing them
            if sidecar and not self._restore_shard(files, part[1][: -len(".json")], raw):
                continue
            with AtomicFile(self.staging / PROGRESS, part[1]) as f:
                f.write(raw)
            self._sent[name] = hashlib.sha256(raw).hexdigest()

    def _restore_shard(self, files: CacheFiles, shard: str, raw: bytes) -> bool:
        """Download `shard` as its sidecar `raw` describes it; False (nothing kept) where the sidecar is not
        valid or the shard is absent or has other bytes."""
        from formats.safe_write import AtomicFile

        try:
            info = loads(raw, files.where(shard + ".json"), max_bytes=MAX_PROGRESS_BYTES)
        except FormatError:
            return False
        size, sha256 = (info.get("bytes"), info.get("sha256")) if isinstance(info, dict) else (None, None)
        if shard not in self._listing or type(size) is not int or not isinstance(sha256, str):
            return False
        try:
            with AtomicFile(self.staging, shard) as f:
                files.copy_to((shard,), f, size=size, sha256=sha256)
        except FormatError:  # damaged, or never finished: the writer redoes its rows
            return False
        self._sent[shard] = sha256
        return True

    # -- during the job --------------------------------------------------------------------------
    def start(self) -> None:
        """Claim the prefix now (the writer has just written `_progress/job.json`: uploaded here, so a store
        that cannot be written stops the job before the teacher starts), then mirror in the background."""
        self.sync()
        self._thread = threading.Thread(target=self._loop, name="kdcache-upload", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.sync()
        except Exception as exc:  # a store that fails mid-job: the job goes on; finish() uploads everything again
            self._error = exc

    def sync(self) -> None:
        """Mirror what the writer has committed: job.json, then each shard and after it its sidecar
        (a sidecar appears only once its shard is in place), and the pending rejects."""
        from formats.schema import SHARD_SUFFIX
        from formats.writer import JOB, PROGRESS

        progress = self.staging / PROGRESS
        if not progress.is_dir():
            return
        self._send(progress / JOB, f"{PROGRESS}/{JOB}")
        for side in sorted(progress.glob(f"*{SHARD_SUFFIX}.json")):
            shard = side.name[: -len(".json")]
            if f"{PROGRESS}/{side.name}" in self._sent:
                continue
            if self._send(self.staging / shard, shard):
                self._send(side, f"{PROGRESS}/{side.name}")
        self._send(progress / "pending_rejects.jsonl", f"{PROGRESS}/pending_rejects.jsonl")

    def _send(self, path: Path, name: str) -> bool:
        """Upload `path` as `name` unless the store holds it complete already; False if it is gone."""
        try:
            digest = sha256_of(path)
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if self._sent.get(name) == digest:
            return True
        if not self.remote.holds(self._listing, name, size, digest):
            self.remote.put(path, name)
        self._sent[name] = digest
        return True

    # -- after the job ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop mirroring (the job failed or finished); its staged files stay for a rerun."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def finish(self) -> None:
        """Upload the finished staged cache (manifest.json last), remove what the store holds beyond it
        (the mirrored `_progress/`, shards redone under other names), then the staging folder."""
        from formats.safe_write import LOCK_NAME
        from formats.schema import MANIFEST_NAME
        from formats.writer import PROGRESS

        self.stop()
        files = local_files(self.staging, skip=(LOCK_NAME, PROGRESS))
        upload_files(self.remote, files, last=MANIFEST_NAME, known=self._sent)
        self.remote.remove(sorted(n for n in self.remote.listing() if n not in files))
        shutil.rmtree(self.staging, ignore_errors=True)

    def finish_complete(self) -> None:
        """The store holds a complete cache: remove what an interrupted clean-up left beside it."""
        from formats.writer import PROGRESS

        self.remote.remove(sorted(n for n in self._listing if n.startswith(f"{PROGRESS}/")))
        shutil.rmtree(self.staging, ignore_errors=True)
