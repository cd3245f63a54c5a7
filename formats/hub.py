"""The Hugging Face Hub in one place: what its failures mean to a user, and the few calls kdcache makes.

Every hub failure kdcache meets (push, pull, `kdcache train --push-to-hub`, and reading a cache over
`hf://datasets/...` through formats/trust.py) becomes one InputError line naming the cause: the hub is
unreachable, HF_HUB_OFFLINE is set, the repo or revision does not exist, the repo is gated, the token is
missing or refused. `hub_errors` is the one mapping; nothing else catches huggingface_hub's exceptions.

huggingface_hub is imported inside the functions (it is heavy, and `kdcache --help` must stay fast).
"""

from __future__ import annotations

import contextlib
import os
import posixpath

from formats.errors import InputError, KDCacheError
from formats.trust import printable

HUB_PREFIX = "hf://"
DATASETS_PREFIX = "hf://datasets/"
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads its boolean environment variables
LOGIN_HINT = "run `hf auth login`, or set HF_TOKEN"


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in TRUE_VALUES


def is_hub_url(path) -> bool:
    return str(path).startswith(HUB_PREFIX)


# ---- failures -> one line ---------------------------------------------------------------------


def hub_error_text(exc: BaseException) -> str | None:
    """The cause of a hub or network failure in words (what to do included), or None when `exc` is not one.

    The exception and what it was raised from are both looked at: HfFileSystem turns a missing repo or
    revision into a FileNotFoundError raised from the hub's RepositoryNotFoundError / RevisionNotFoundError."""
    try:
        from huggingface_hub import errors as hf
    except ImportError:  # no huggingface_hub: no hub failure to name
        return None
    for e in chain(exc):
        if isinstance(e, hf.RemoteEntryNotFoundError):  # a file the repo lacks: not a failure (the caller says)
            return None
        text = _one_cause(e)
        if text is not None:
            return text
    return None


def chain(exc: BaseException):
    """`exc` and what it was raised from (or during), as Python would print them."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _one_cause(e: BaseException) -> str | None:
    from huggingface_hub import errors as hf

    if isinstance(e, hf.OfflineModeIsEnabled) or (isinstance(e, hf.LocalEntryNotFoundError) and offline()):
        return "HF_HUB_OFFLINE=1 is set, so the hub is not contacted: unset HF_HUB_OFFLINE (or use a local copy)"
    if isinstance(e, hf.LocalEntryNotFoundError):
        return (
            "the hub cannot be reached and the file is not in the local hub cache: check the network "
            "(or HF_ENDPOINT / the proxy settings), then rerun"
        )
    if isinstance(e, hf.GatedRepoError):
        return f"the repo is gated: accept its conditions on its hub page with your account, and {LOGIN_HINT}"
    if isinstance(e, hf.RepositoryNotFoundError):
        return (
            "the repo does not exist (or it is private and this token cannot see it): check the id "
            f"(a dataset is hf://datasets/USER/NAME), or {LOGIN_HINT}"
        )
    if isinstance(e, hf.RevisionNotFoundError):
        return "the revision does not exist in that repo: check --revision (a branch, tag or commit)"
    if isinstance(e, hf.DisabledRepoError):
        return "the repo has been disabled on the hub"
    if isinstance(e, hf.LocalTokenNotFoundError):
        return f"no Hugging Face token found: {LOGIN_HINT}"
    if isinstance(e, hf.HFValidationError):
        return f"not a valid hub repo id ({printable(e)}): a repo id is USER/NAME"
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return f"the hub refused the token (HTTP 401: missing, invalid or expired): {LOGIN_HINT}"
        if status == 403:
            return (
                "the hub forbids this (HTTP 403): the token lacks write access to that repo or namespace; "
                "use a token with write permission"
            )
        first = printable(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)[:200]
        return f"the hub answered HTTP {status}: {first}"
    if is_connection_error(e):
        return (
            f"cannot reach the hub ({type(e).__name__}: {printable(e)[:160]}): check the network "
            "(or HF_ENDPOINT / the proxy settings), then rerun"
        )
    return None


def is_connection_error(e: BaseException) -> bool:
    """httpx / httpx2 transport errors (huggingface_hub's HTTP client), requests' connection errors and the
    socket's own (ConnectionError, TimeoutError)."""
    classes = [ConnectionError, TimeoutError]
    for module, names in (("httpx", ("TransportError",)), ("httpx2", ("TransportError",))):
        with contextlib.suppress(ImportError):
            mod = __import__(module)
            classes += [getattr(mod, n) for n in names if hasattr(mod, n)]
    with contextlib.suppress(ImportError):
        import requests

        classes += [requests.ConnectionError, requests.Timeout]
    return isinstance(e, tuple(classes))


@contextlib.contextmanager
def hub_errors(what: str):
    """`with hub_errors("hf://datasets/u/c"): ...`: a hub or network failure inside becomes one InputError
    line, `what: cause`; kdcache's own errors and anything else pass unchanged."""
    try:
        yield
    except KDCacheError:
        raise
    except Exception as exc:
        text = hub_error_text(exc)
        if text is None:
            raise
        raise InputError(f"{printable(what)}: {text}") from None


# ---- repo ids and tokens ------------------------------------------------------------------------


def dataset_repo_id(target: str) -> str | None:
    """`user/name` or `hf://datasets/user/name` -> "user/name"; None when `target` is not a hub dataset
    (a folder or another fsspec URL). A hub URL that is not a dataset repo id is an InputError."""
    target = str(target)
    if target.startswith(DATASETS_PREFIX):
        repo_id = target[len(DATASETS_PREFIX) :].strip("/")
    elif target.startswith(HUB_PREFIX):
        raise InputError(f"{printable(target)}: a cache is pushed to a dataset repo: hf://datasets/USER/NAME")
    elif "://" in target or target.startswith((".", "/", "~")) or os.path.exists(target) or target.count("/") != 1:
        return None
    elif os.path.isdir(target.split("/")[0]):
        raise InputError(
            f"{printable(target)}: a hub repo id or the local folder ./{printable(target)}? Write "
            f"hf://datasets/{printable(target)} for the hub, ./{printable(target)} for the folder"
        )
    else:
        repo_id = target
    check_repo_id(repo_id)
    return repo_id


def check_repo_id(repo_id: str) -> str:
    """USER/NAME as the hub accepts it (huggingface_hub's own rule), else InputError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("a repo id is USER/NAME")
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InputError(f"{printable(repo_id)!r} is not a hub repo id ({printable(exc)}); give USER/NAME") from None
    return repo_id


def token_from_env() -> str:
    """--token-from-env: HF_TOKEN, and only it."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise InputError("--token-from-env: HF_TOKEN is not set (or empty); export HF_TOKEN=hf_... or drop the flag")
    return token


def check_can_write(repo_id: str, what: str, token: str | None = None) -> str | None:
    """What can be checked before any work (offline, no request): the repo id is valid, HF_HUB_OFFLINE is
    not set and a token exists (`token`, else huggingface_hub's lookup: HF_TOKEN, the stored login).
    Returns the token to use (None: huggingface_hub's own lookup). The hub's answer comes at upload."""
    check_repo_id(repo_id)
    if offline():
        raise InputError(f"{what}: HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; unset HF_HUB_OFFLINE")
    if token is None:
        from huggingface_hub import get_token

        if not get_token():
            raise InputError(f"{what}: no Hugging Face token found to upload with: {LOGIN_HINT}")
    return token


# ---- the calls ---------------------------------------------------------------------------------


def api(token: str | None = None):
    """An HfApi (token None: huggingface_hub's normal lookup)."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def prepare_repo(hf, repo_id: str, *, repo_type: str, private: bool, revision: str | None) -> None:
    """Create the repo if it is not there (exist_ok: an existing repo keeps its visibility) and the branch
    `revision` if given and missing (from the default branch)."""
    hf.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if revision:
        hf.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True)


def remote_files(hf, repo_id: str, *, repo_type: str, revision: str | None) -> dict:
    """path -> RepoFile of every file in the repo at `revision` (for a resumed upload)."""
    from huggingface_hub.hf_api import RepoFile

    entries = hf.list_repo_tree(repo_id, repo_type=repo_type, revision=revision, recursive=True)
    return {e.path: e for e in entries if isinstance(e, RepoFile)}


def same_remote_file(entry, size: int, sha256: str | None, local_path=None) -> bool:
    """A file in the repo is the local one: the same size and, for an LFS file, the same sha256 (which the
    hub lists: free); for a regular (small) one, the same git blob id (computed from `local_path`)."""
    if entry is None or entry.size != size:
        return False
    if entry.lfs is not None:
        return sha256 is not None and entry.lfs.sha256 == sha256
    return local_path is not None and entry.blob_id == git_blob_id(local_path)


def git_blob_id(path) -> str:
    """git's object id of a file (sha1 of "blob <size>\\0" + bytes): what the hub lists for a non-LFS file."""
    import hashlib

    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def upload_folder_files(folder, repo_id: str, *, repo_type: str = "model", token=None, private=False, log=print):
    """Upload every plain file under `folder` (no link followed or uploaded) to the repo's default branch in
    one commit (`kdcache train --push-to-hub`: the run's final/). Returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd

    names = plain_files(folder)
    if not names:
        raise InputError(f"{printable(str(folder))}: nothing to upload (no files)")
    with hub_errors(f"upload to {repo_id}"):
        hf = api(token)
        prepare_repo(hf, repo_id, repo_type=repo_type, private=private, revision=None)
        ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=os.path.join(folder, n)) for n in names]
        log(f"uploading {len(ops)} files of {folder} to {repo_id}")
        info = hf.create_commit(
            repo_id, ops, repo_type=repo_type, commit_message=f"kdcache: upload {posixpath.basename(str(folder))}"
        )
    return getattr(info, "commit_url", None) or str(info)


def plain_files(folder) -> list[str]:
    """Paths (relative, '/'-separated) of the regular files under `folder`; a symlink, FIFO or device is
    refused (InputError): an upload sends only files kdcache wrote, never what a link points to."""
    import stat

    out = []
    for top, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(top, name)
            mode = os.lstat(full).st_mode
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise InputError(f"{printable(full)}: not a plain file (a symlink?); refusing to upload it: remove it")
            out.append(rel)
    return sorted(out)
