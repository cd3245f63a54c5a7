"""`kdcache push` and `kdcache pull`: a verified cache to the Hugging Face Hub or any fsspec store, and back.

push (docs/SHARING.md):
- the cache is verified first (formats.tools.verify_cache); one that fails is refused before anything is
  written anywhere;
- exactly the files the manifest accounts for are sent (formats.tools.listed_files: shards, rejects,
  tokenizer files, manifest.json) plus the card (README.md): never an unlisted file; each is checked to be
  a plain file (never a symlink) of the size the manifest records;
- shards first, manifest.json last: the manifest's presence on the target means every file it names is
  there (on the Hub, the last commit adds the small files and the manifest together, atomically);
- resumable: a rerun skips what the target already holds (the same size; on the Hub also the same sha256,
  which the Hub lists for LFS files, or git blob id for small ones; in a local folder the same sha256) and
  finishes the rest;
- a target that holds files this cache does not list (another cache?) is refused before any upload, and a
  different manifest.json there is removed first, so during a push the target never looks like a
  complete cache it is not.

pull: the manifest first (size bounded before it is downloaded), checked by the trust boundary
(formats.manifest.load_manifest: names, types, bounds), then exactly the files it lists, each of the size
the manifest records (refused before download otherwise), all at one pinned commit, into a hidden staging
folder beside DIR; then verify_cache. Only a cache that verifies becomes DIR (one rename); one that fails
is deleted and DIR is never created, so nothing at DIR looks like a cache that was not verified. A pull
interrupted by the network keeps its staging folder and a rerun resumes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import stat
import sys
from pathlib import Path

from formats import hub
from formats.errors import ChecksumError, FormatError, InputError
from formats.manifest import MAX_MANIFEST_BYTES, load_manifest, open_cache
from formats.safe_write import AtomicFile, make_folder
from formats.schema import CARD_NAME, MANIFEST_NAME, SHARD_SUFFIX
from formats.tokenizer_files import TOKENIZER_DIR
from formats.tools import listed_files, verify_cache
from formats.trust import printable

MAX_CARD_BYTES = 16 << 20  # a card is text: kdcache's are a few KB, the hub's own limit is far below this
SHARDS_PER_COMMIT = 50  # hub commits of shards: a resumed push redoes at most one such batch
BYTES_PER_COMMIT = 20 << 30
KEEP_ON_TARGET = {".gitattributes"}  # what a new hub repo holds: not another cache's file


@dataclasses.dataclass
class Item:
    """One file to send: its name in the cache (and on the target), local path, size, sha256."""

    name: str
    path: Path
    size: int
    sha256: str

    @property
    def shard(self) -> bool:
        return self.name.endswith(SHARD_SUFFIX) and "/" not in self.name


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- push -------------------------------------------------------------------------------------


def push_cache(
    cache,
    target: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    storage_options: dict | None = None,
    log=_log,
) -> dict:
    """Publish the local cache folder `cache` to `target`: a hub dataset repo (`user/name`,
    `hf://datasets/user/name`) or an fsspec URL / local folder. Returns {"target", "sent", "skipped"}."""
    repo_id = hub.dataset_repo_id(target)
    if repo_id is not None:
        token = hub.check_can_write(repo_id, f"push to {repo_id}", token)
    elif revision or private:
        raise InputError(f"{printable(target)}: --revision and --private are for a hub repo (USER/NAME)")
    files, items = verified_items(cache)
    if repo_id is not None:
        return _push_hub(items, repo_id, private=private, revision=revision, token=token, log=log)
    return _push_store(files, items, target, storage_options=storage_options, log=log)


def verified_items(cache) -> tuple:
    """The cache (formats.trust.CacheFiles) and the files to send, in order (shards, the other listed files,
    the card, manifest.json last), after verify_cache passed; FormatError (one line, nothing sent) when it
    does not. The manifest sent is the one verified: its bytes are hashed before verify and again after."""
    files = open_cache(cache)
    if not files.local:
        raise InputError(f"{printable(files.path)}: push sends a local cache folder (pull or copy it here first)")
    try:
        before = _manifest_digest(files)
        verify_cache(files)
    except FormatError as exc:
        raise type(exc)(f"refusing to push a cache that fails `kdcache verify` (nothing was sent): {exc}") from None
    manifest = load_manifest(files)
    known = {s["file"]: (s["bytes"], s["sha256"]) for s in manifest["shards"]}
    known |= {f"{TOKENIZER_DIR}/{e['file']}": (e["bytes"], e["sha256"]) for e in manifest.get("tokenizer_files") or []}
    if manifest.get("rejects_file"):
        known[manifest["rejects_file"]["file"]] = (None, manifest["rejects_file"]["sha256"])
    names = listed_files(manifest)
    if files.kind(CARD_NAME) == "file":
        names.insert(len(names) - 1, CARD_NAME)
    items = []
    for name in names:
        parts = name.split("/")
        size, digest = known.get(name, (None, None))
        size = files.require_file(*parts, size=size)
        if digest is None:  # the card and the manifest: small, hashed here
            cap = MAX_MANIFEST_BYTES if name == MANIFEST_NAME else MAX_CARD_BYTES
            digest = hashlib.sha256(files.read_bytes(*parts, max_bytes=cap, listed_in="the cache")).hexdigest()
        items.append(Item(name, Path(files.where(*parts)), size, digest))
    if items[-1].sha256 != before:
        raise FormatError(f"{printable(files.where(MANIFEST_NAME))}: changed while it was verified; nothing was sent")
    return files, items


def _manifest_digest(files) -> str:
    raw = (
        files.read_bytes(MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES, listed_in="the cache")
        if files.exists(MANIFEST_NAME)
        else b""
    )
    return hashlib.sha256(raw).hexdigest()


def _check_plain(item: Item) -> None:
    """Right before a file is sent: still a plain file of its size (not replaced by a link since verify)."""
    st = os.lstat(item.path)
    if not stat.S_ISREG(st.st_mode) or st.st_size != item.size:
        raise FormatError(
            f"{printable(str(item.path))}: changed since it was verified (now not a plain file of "
            f"{item.size} bytes); nothing more was sent: rerun push once the cache is whole"
        )


def _refuse_foreign(present, items: list[Item], where: str) -> None:
    ours = {i.name for i in items} | KEEP_ON_TARGET
    others = sorted(n for n in present if n not in ours)
    if others:
        shown = ", ".join(printable(n) for n in others[:3]) + (", ..." if len(others) > 3 else "")
        raise InputError(
            f"{printable(where)} holds files this cache does not list ({shown}); push to a new or empty "
            "repo/folder, or remove them there first (nothing was sent)"
        )


# -- the Hub --


def _push_hub(items: list[Item], repo_id: str, *, private: bool, revision: str | None, token, log) -> dict:
    """Upload with HfApi.create_commit, in commits of at most SHARDS_PER_COMMIT shards, then one last
    commit of the small files and manifest.json.

    Why create_commit rather than upload_large_folder: upload_large_folder scans a folder by patterns and
    commits files in whatever order its workers finish (manifest.json could be committed before a shard it
    names, and a reader in between would see a cache with a missing shard); create_commit takes exactly our
    list, in our order, and a commit is atomic. Resume is ours: the repo's tree (sizes, LFS sha256, git blob
    ids) against the manifest's, so a rerun commits only what is missing. Byte progress is
    huggingface_hub's own (its upload bars); a line per commit is ours."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    url = f"hf://datasets/{repo_id}" + (f"@{revision}" if revision else "")
    with hub.hub_errors(url):
        hf = hub.api(token)
        hub.prepare_repo(hf, repo_id, repo_type="dataset", private=private, revision=revision)
        remote = hub.remote_files(hf, repo_id, repo_type="dataset", revision=revision)
        _refuse_foreign(remote, items, url)
        todo = [i for i in items if not hub.same_remote_file(remote.get(i.name), i.size, i.sha256, i.path)]
        skipped = len(items) - len(todo)
        if skipped:
            log(f"{url}: {skipped} of {len(items)} files already there (same size and hash), skipped")
        manifest_stale = MANIFEST_NAME in remote and any(i.name == MANIFEST_NAME for i in todo)
        shards = [i for i in todo if i.shard]
        rest = [i for i in todo if not i.shard]
        batches = _batches(shards)
        for n, batch in enumerate(batches, 1):
            ops = [_add(CommitOperationAdd, i) for i in batch]
            if manifest_stale and n == 1:  # the old manifest goes before any shard changes under it
                ops.append(CommitOperationDelete(path_in_repo=MANIFEST_NAME))
            log(f"{url}: commit {n}/{len(batches) + 1}: {len(batch)} shards ({sum(i.size for i in batch)} bytes)")
            hf.create_commit(
                repo_id,
                ops,
                repo_type="dataset",
                revision=revision,
                commit_message=f"kdcache push: shards ({n}/{len(batches)})",
            )
            _check_sent(ops, batch)
        if rest:
            ops = [_add(CommitOperationAdd, i) for i in rest]
            log(f"{url}: commit {len(batches) + 1}/{len(batches) + 1}: {', '.join(i.name for i in rest)}")
            hf.create_commit(
                repo_id,
                ops,
                repo_type="dataset",
                revision=revision,
                commit_message="kdcache push: manifest, card, rejects, tokenizer files",
            )
            _check_sent(ops, rest)
    return {"target": url, "sent": [i.name for i in todo], "skipped": skipped}


def _batches(shards: list[Item]) -> list[list[Item]]:
    out, size = [], 0
    for item in shards:
        if not out or len(out[-1]) >= SHARDS_PER_COMMIT or size + item.size > BYTES_PER_COMMIT:
            out.append([])
            size = 0
        out[-1].append(item)
        size += item.size
    return out


def _add(op_class, item: Item):
    _check_plain(item)
    return op_class(path_in_repo=item.name, path_or_fileobj=str(item.path))


def _check_sent(ops, items: list[Item]) -> None:
    """The bytes committed hashed to the manifest's sha256 (huggingface_hub hashes what it uploads; a
    file replaced since verify is caught here, before manifest.json is committed after it)."""
    for op, item in zip(ops, items):
        if op.upload_info.sha256.hex() != item.sha256:
            raise ChecksumError(
                f"{printable(str(item.path))}: the uploaded bytes differ from the manifest's sha256 (the file "
                "changed during the push); manifest.json was not uploaded: restore the file and rerun push"
            )


# -- an fsspec store or a local folder --


def _push_store(files, items: list[Item], target: str, *, storage_options, log) -> dict:
    """A local folder (a path or file://, as fsspec resolves it) or an object store."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(target, **(storage_options or {}))
    if "file" in ({fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)):
        return _push_local(files, items, Path(root), log=log)
    return _push_remote(items, target, storage_options=storage_options, log=log)


def _push_local(files, items: list[Item], out: Path, *, log) -> dict:
    """Into a local folder: every file through formats.safe_write (a planted link there is replaced,
    never written through), copied from the cache through formats.trust (hashed as it streams)."""
    if out.resolve() == Path(files.root).resolve():
        raise InputError(f"{printable(str(out))}: is the cache itself; push to another folder")
    make_folder(out)
    target = open_cache(out)
    present = {rel: kind for rel, kind in target.walk() if kind != "dir" and not _temporary(rel)}
    _refuse_foreign(present, items, str(out))
    if present.get(MANIFEST_NAME) == "file" and not _same_local(target, items[-1]):
        os.unlink(out / MANIFEST_NAME)
    sent, skipped = [], 0
    for item in items:
        if present.get(item.name) == "file" and _same_local(target, item):
            skipped += 1
            continue
        _check_plain(item)
        parts = item.name.split("/")
        folder = make_folder(out.joinpath(*parts[:-1]))
        with AtomicFile(folder, parts[-1]) as f:
            files.copy_to(tuple(parts), f, size=item.size, sha256=item.sha256)
        sent.append(item.name)
        log(f"{out}: {item.name} ({item.size} bytes)")
    return {"target": str(out), "sent": sent, "skipped": skipped}


def _temporary(rel: str) -> bool:
    """An AtomicFile's temporary left by a killed push (`.NAME.PID.HEX.tmp`): not another cache's file."""
    base = rel.rsplit("/", 1)[-1]
    return base.startswith(".") and base.endswith(".tmp")


def _same_local(target, item: Item) -> bool:
    """The target folder holds `item` already: a plain file of its size whose bytes hash to its sha256."""
    try:
        with target.open(*item.name.split("/"), size=item.size, sha256=item.sha256) as f:
            f.verify()
        return True
    except FormatError:
        return False


def _push_remote(items: list[Item], url: str, *, storage_options, log) -> dict:
    """To an object store (formats.remote_write.Remote: each file one PUT, which appears whole or not at
    all). Resume trusts an object listed with the file's size (hashing it back would download it)."""
    from formats.remote_write import Remote

    remote = Remote(url, storage_options)
    listing = remote.listing()
    _refuse_foreign(listing, items, remote.url)
    if MANIFEST_NAME in listing:
        remote.remove([MANIFEST_NAME])  # a reader must not see the old manifest over the files that change
        listing.pop(MANIFEST_NAME)
    sent, skipped = [], 0
    for item in items:
        if item.name != MANIFEST_NAME and listing.get(item.name) == item.size:
            skipped += 1
            continue
        _check_plain(item)
        remote.put(item.path, item.name)
        sent.append(item.name)
        log(f"{remote.url}: {item.name} ({item.size} bytes)")
    return {"target": remote.url, "sent": sent, "skipped": skipped}


# ---- pull -------------------------------------------------------------------------------------


def pull_cache(repo: str, out, *, revision: str | None = None, token: str | None = None, log=_log) -> dict:
    """Download the cache in hub dataset repo `repo` into the new folder `out` and verify it (see the
    module's docstring). Returns verify_cache's result plus "commit" (the commit pulled)."""
    repo_id = hub.dataset_repo_id(repo)
    if repo_id is None:
        raise InputError(f"{printable(repo)}: pull takes a hub dataset repo (USER/NAME or hf://datasets/USER/NAME)")
    out = Path(out)
    if os.path.lexists(out) and (out.is_symlink() or not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{printable(str(out))} exists and is not an empty folder; pull writes a new folder")
    staging = out.parent / f".{out.name}.kdcache-pull"
    url = f"hf://datasets/{repo_id}" + (f"@{revision}" if revision else "")
    with hub.hub_errors(url):
        hf = hub.api(token)
        commit = hf.repo_info(repo_id, repo_type="dataset", revision=revision).sha  # every file from one commit
        remote = hub.remote_files(hf, repo_id, repo_type="dataset", revision=commit)
        entry = remote.get(MANIFEST_NAME)
        if entry is None:
            raise FormatError(f"{url}: no {MANIFEST_NAME} in the repo; it is not a kdcache cache")
        if not 0 < entry.size <= MAX_MANIFEST_BYTES:
            raise FormatError(
                f"{url}: {MANIFEST_NAME} is {entry.size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may "
                "hold; the repo is damaged or hostile (nothing downloaded)"
            )
        make_folder(out.parent)
        make_folder(staging)
        log(f"{url}: {MANIFEST_NAME} (commit {commit})")
        hf.hf_hub_download(repo_id, MANIFEST_NAME, repo_type="dataset", revision=commit, local_dir=str(staging))
        try:
            manifest = load_manifest(staging)  # the trust boundary: names, types, bounds
            names = _pull_list(manifest, remote, url)
        except FormatError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log(f"{url}: {len(names)} files, {sum(remote[n].size for n in names)} bytes")
        if names:  # (an empty allow_patterns must never reach snapshot_download)
            hf.snapshot_download(
                repo_id, repo_type="dataset", revision=commit, local_dir=str(staging), allow_patterns=names
            )
    try:
        result = verify_cache(staging)
    except FormatError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise type(exc)(f"{url}: the downloaded cache fails verify; deleted, {out} not created: {exc}") from None
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download records
    os.replace(staging, out)  # `out` absent or an empty folder: one rename
    return {**result, "commit": commit}


def _pull_list(manifest: dict, remote: dict, url: str) -> list[str]:
    """The files to download: exactly those the (checked) manifest lists, plus the card; each must be in
    the repo with the size the manifest records (a bounded size where it records none)."""
    from formats.tools import MAX_REJECTS_BYTES

    sizes = {s["file"]: s["bytes"] for s in manifest["shards"]}
    sizes |= {f"tokenizer/{e['file']}": e["bytes"] for e in manifest.get("tokenizer_files") or []}
    lfs = {s["file"]: s["sha256"] for s in manifest["shards"]}
    lfs |= {f"tokenizer/{e['file']}": e["sha256"] for e in manifest.get("tokenizer_files") or []}
    names = [n for n in listed_files(manifest) if n != MANIFEST_NAME]
    if CARD_NAME in remote:
        names.append(CARD_NAME)
    for name in names:
        entry = remote.get(name)
        if entry is None:
            raise FormatError(f"{url}: the manifest lists {printable(name)}, which the repo does not hold")
        cap = sizes.get(name, MAX_CARD_BYTES if name == CARD_NAME else MAX_REJECTS_BYTES)
        if entry.size != sizes.get(name, entry.size) or entry.size > cap:
            raise ChecksumError(
                f"{url}: {printable(name)} is {entry.size} bytes in the repo, the manifest says "
                f"{sizes.get(name, f'at most {cap}')}; nothing more downloaded (the repo is damaged or hostile)"
            )
        if entry.lfs is not None and name in lfs and entry.lfs.sha256 != lfs[name]:
            raise ChecksumError(
                f"{url}: {printable(name)} has sha256 {entry.lfs.sha256[:16]}... in the repo, the manifest says "
                f"{lfs[name][:16]}...; nothing more downloaded (the repo is damaged or hostile)"
            )
    return names
