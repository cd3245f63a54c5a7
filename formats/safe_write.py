"""Writing into a cache folder without following links: the other half of formats/trust.py.

Everything kdcache writes into a cache (manifest, card, rejects, copied shards and tokenizer files)
goes through here. A file is written to a fresh temporary name in the target folder, created with
O_CREAT | O_EXCL | O_NOFOLLOW relative to the folder's descriptor (so a planted symlink is never
opened, let alone written through), fsynced, then renamed over the final name (a rename replaces a
symlink there instead of writing to its target), and the folder is fsynced. Names must be plain
names (formats.trust.SAFE_NAME): nothing lands outside the folder it was told to write.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

from formats.errors import InputError
from formats.trust import SAFE_NAME, printable


def _folder_fd(folder) -> int:
    """An fd of `folder` (which the caller named: it may itself be a link the user chose)."""
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY)


def _plain(name: str) -> str:
    if not SAFE_NAME.fullmatch(name):
        raise InputError(f"{printable(name)!r}: kdcache writes only plain file names (letters, digits, '.', '_', '-')")
    return name


class AtomicFile:
    """`with AtomicFile(folder, name) as f: f.write(...)`: the file appears under `name` complete, or not at
    all (an exception discards it)."""

    def __init__(self, folder, name: str, mode: int = 0o644):
        self.folder, self.name = Path(folder), _plain(name)
        self._dir = _folder_fd(self.folder)
        self.tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=self._dir)
        except BaseException:
            os.close(self._dir)
            raise
        self._f = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> int:
        return self._f.write(data)

    @property
    def handle(self):
        """The open temporary file (e.g. for a streaming writer); closed and renamed by __exit__."""
        return self._f

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
                os.replace(self.tmp, self.name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
                os.fsync(self._dir)
            else:
                try:
                    self._f.close()  # flushing may fail again (a full disk): the temporary goes all the same
                except OSError:
                    pass
                os.unlink(self.tmp, dir_fd=self._dir)
        finally:
            os.close(self._dir)
        return False


def write_bytes_atomic(path, data: bytes) -> None:
    path = Path(path)
    with AtomicFile(path.parent, path.name) as f:
        f.write(data)


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def make_folder(path) -> Path:
    """Create `path` (and its parents) as real folders; an existing symlink or file there is refused."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        path.mkdir(parents=True, exist_ok=True)
        return path
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(
            f"{printable(str(path))}: exists and is not a folder (a file or a symbolic link); give a new folder"
        )
    return path


def fsync_dir(path) -> None:
    fd = _folder_fd(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOCK_NAME = ".kdcache-lock"


_HELD: dict[str, "FolderLock"] = {}  # this process's locks, by folder


class FolderLock:
    """An exclusive lock on a folder one job writes (`kdcache cache --out`): a second job on the same folder
    stops at once with the holder's pid, host and start time. The kernel releases the lock when its process
    dies (a killed job leaves no stale lock to clean up); the file is removed when the job ends well.
    Within one process, a new lock on a folder takes over from an earlier one (a writer the process
    abandoned, as a crash would: one process writes a folder through one writer at a time)."""

    def __init__(self, folder):
        import fcntl
        import socket
        import time

        self.path = make_folder(folder) / LOCK_NAME
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD.pop(key).release()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise InputError(
                f"{printable(str(folder))} is being written by {printable(holder)}; wait for that job to "
                "finish (a rerun then resumes or finds the cache complete), or write to another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(),
        )
        self._fd, self._key = fd, key
        _HELD[key] = self

    def release(self, remove: bool = False) -> None:
        if self._fd is None:
            return
        try:
            if remove:
                self.path.unlink(missing_ok=True)
        finally:  # whatever happens, the lock goes with the descriptor
            os.close(self._fd)
            self._fd = None
            if _HELD.get(self._key) is self:
                del _HELD[self._key]
