"""A stand-in for the Hugging Face Hub at huggingface_hub's API boundary: the HfApi methods kdcache calls are
patched to record their arguments and to serve and store repos as local folders (one per repo id and
revision). Nothing here talks to a network; what the real Hub would do beyond these calls is not tested."""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import shutil
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.hf_api import RepoFile

LFS_SUFFIXES = (".parquet",)  # what the Hub's default .gitattributes stores in LFS
MAIN_SHA = "0" * 40  # the commit repo_info reports for the default branch


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.calls: list[tuple[str, dict]] = []
        self.commits: list[dict] = []
        self.lfs = True  # list parquet files with their LFS sha256 (as the Hub does)
        self.fail_commit_after: int | None = None  # raise on the commit after this many

    # -- the repo folders --
    def folder(self, repo_id: str, revision: str | None = None) -> Path:
        return self.root / repo_id.replace("/", "--") / ("main" if revision in (None, MAIN_SHA) else revision)

    def put(self, repo_id: str, name: str, data: bytes, revision: str | None = None) -> None:
        path = self.folder(repo_id, revision) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def serve(self, repo_id: str, cache: Path, revision: str | None = None) -> Path:
        """A repo holding a copy of the folder `cache` (as a push or `hf upload` would leave it)."""
        dest = self.folder(repo_id, revision)
        shutil.copytree(cache, dest, dirs_exist_ok=True)
        (dest / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
        return dest

    def names(self, kind: str) -> list[str]:
        return [c[0] for c in self.calls if c[0] == kind]

    # -- patched HfApi methods --
    def install(self, monkeypatch) -> "FakeHub":
        hub = self

        def record(name):
            real = inspect.signature(getattr(HfApi, name))

            def method(self_api, *args, **kwargs):
                real.bind(self_api, *args, **kwargs)  # a call the real HfApi would not accept fails here
                hub.calls.append((name, {"args": args, **kwargs}))
                return getattr(hub, f"_{name}")(*args, **kwargs)

            return method

        for name in (
            "create_repo",
            "create_branch",
            "list_repo_tree",
            "create_commit",
            "repo_info",
            "hf_hub_download",
            "snapshot_download",
        ):
            monkeypatch.setattr(HfApi, name, record(name))
        return self

    def _create_repo(self, repo_id, **kw):
        folder = self.folder(repo_id)
        if not folder.exists():
            folder.mkdir(parents=True)
            (folder / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
        return SimpleNamespace(repo_id=repo_id)

    def _create_branch(self, repo_id, *, branch, **kw):
        dest = self.folder(repo_id, branch)
        if not dest.exists():
            shutil.copytree(self.folder(repo_id), dest)

    def _list_repo_tree(self, repo_id, path_in_repo=None, *, revision=None, recursive=False, **kw):
        folder = self.folder(repo_id, revision)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                rel = path.relative_to(folder).as_posix()
                lfs = None
                if self.lfs and rel.endswith(LFS_SUFFIXES):
                    lfs = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 130}
                yield RepoFile(path=rel, size=len(data), oid=blob_id(data), lfs=lfs)

    def _create_commit(self, repo_id, operations, *, revision=None, commit_message="", **kw):
        if self.fail_commit_after is not None and len(self.commits) >= self.fail_commit_after:
            raise ConnectionError("the network went away")
        folder = self.folder(repo_id, revision)
        ops = list(operations)
        for op in ops:
            if isinstance(op, CommitOperationAdd):
                with op.as_file() as f:
                    data = f.read()
                op.upload_info.sha256 = hashlib.sha256(data).digest()  # as huggingface_hub backfills it
                dest = folder / op.path_in_repo
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
            elif isinstance(op, CommitOperationDelete):
                (folder / op.path_in_repo).unlink()
        self.commits.append(
            {
                "revision": revision,
                "message": commit_message,
                "add": [op.path_in_repo for op in ops if isinstance(op, CommitOperationAdd)],
                "delete": [op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete)],
            }
        )
        return SimpleNamespace(commit_url=f"https://fake/{repo_id}/commit/{len(self.commits)}")

    def _repo_info(self, repo_id, *, revision=None, **kw):
        return SimpleNamespace(sha=revision or MAIN_SHA)

    def _hf_hub_download(self, repo_id, filename, *, revision=None, local_dir=None, **kw):
        src = self.folder(repo_id, revision) / filename
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)  # as the real one does
        return str(dest)

    def _snapshot_download(self, repo_id, *, revision=None, local_dir=None, allow_patterns=None, **kw):
        folder = self.folder(repo_id, revision)
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]):
                dest = Path(local_dir) / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
        return str(local_dir)
