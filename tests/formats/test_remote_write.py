"""formats/remote_write.py: `kdcache cache`, `merge` and `export` writing straight to an object store, against
a real S3-compatible server (moto, the `s3` fixture) on loopback: a job killed mid-upload (or SIGKILLed mid-run)
and rerun ends with a store that verifies and reads back the bytes a local run writes; read-only protocols and
missing backends stop with one line before any work."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import kdcache.cli as kdcache_cli
from formats import CacheReader, CacheWriter, CodecConfig
from formats.errors import InputError
from formats.export import export_cache
from formats.remote_write import CacheUpload, Remote, check_writable, staging_dir
from formats.tools import merge_caches, verify_cache

from ..cache_teacher import conftest as teacher_fixtures
from .format_helpers import PROVENANCE
from ..cache_teacher.teacher_helpers import REPO, write_jsonl


class Killed(BaseException):
    """The process died mid-upload: no cleanup runs (not `except Exception`)."""


@pytest.fixture
def store(s3, monkeypatch, tmp_path):
    """The moto server as the environment names it (as a user's `kdcache ... --out s3://` sees it: AWS_*
    variables, no storage options), staging under tmp_path; yields (s3fs filesystem, bucket URL)."""
    import s3fs

    fs, options = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])
    monkeypatch.setenv("KDCACHE_STAGING", str(tmp_path / "staging"))
    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem would keep an earlier test's endpoint
    yield fs, "s3://kd-bucket"
    s3fs.S3FileSystem.clear_instance_cache()


class Uploads:
    """A spy on Remote.put: the names uploaded, in order; dies (Killed) before upload number `die_after` + 1."""

    def __init__(self, monkeypatch, die_after: int | None = None):
        self.sent: list[str] = []
        self.die_after = die_after
        put = Remote.put

        def put_counted(remote, local, name):
            if self.die_after is not None and len(self.sent) == self.die_after:
                raise Killed(f"killed before uploading {name}")
            put(remote, local, name)
            self.sent.append(name)

        monkeypatch.setattr(Remote, "put", put_counted)


tiny_dir = teacher_fixtures.tiny_dir  # the random 2-layer Llama teacher (a session fixture)


def rows(url) -> dict:
    """Every example of a cache, all its stored values (arrays as bytes: byte-identical means equal here)."""
    return {
        ex.id: (
            ex.source,
            ex.finish_reason,
            repr(ex.meta),
            *(np.ascontiguousarray(a).tobytes() for a in (ex.input_ids, ex.target_positions, ex.topk_ids)),
            *(np.ascontiguousarray(a).tobytes() for a in (ex.topk_logprobs, ex.target_logprobs, ex.target_ranks)),
        )
        for ex in CacheReader(url)
    }


# ---- protocols that cannot be written -----------------------------------------------------------


def no_gcsfs(monkeypatch) -> None:
    """gs:// without its backend, whether or not gcsfs is installed here."""
    import importlib

    monkeypatch.setitem(sys.modules, "gcsfs", None)
    monkeypatch.delitem(importlib.import_module("fsspec.registry")._registry, "gs", raising=False)


@pytest.mark.parametrize(
    "url, says",
    [
        ("https://example.org/caches/c", "read-only"),
        ("github://org:repo@main/c", "read-only"),
        ("nosuchproto://bucket/c", "fsspec knows no protocol"),
        ("simplecache::s3://bucket/c", "chained"),
        ("gs://bucket/c", "pip install gcsfs"),
    ],
)
def test_unwritable_urls_are_one_line_errors(url, says, monkeypatch):
    no_gcsfs(monkeypatch)
    with pytest.raises(InputError, match=says) as info:
        check_writable(url)
    assert "\n" not in str(info.value)


def test_local_and_file_urls_need_no_backend():
    check_writable("/tmp/x")
    check_writable("file:///tmp/x")


@pytest.mark.parametrize("url", ["https://example.org/c", "gs://bucket/c"])
def test_cache_merge_export_stop_before_any_work(url, cache, tmp_path, monkeypatch, capsys):
    """No teacher or tokenizer loads, no input is read, no file or staging folder is written."""
    import cache_teacher.engines.factory as factory
    import cache_teacher.provenance as provenance
    import formats.reader as reader

    no_gcsfs(monkeypatch)
    for owner, name in ((factory, "load_engine"), (provenance, "teacher_tokenizer"), (reader, "CacheReader")):
        monkeypatch.setattr(owner, name, lambda *a, **k: pytest.fail("work started before the output was checked"))
    monkeypatch.setenv("KDCACHE_STAGING", str(tmp_path / "staging"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "messages": []}])
    commands = [
        ["cache", "--teacher", str(tmp_path), "--dataset", str(data), "--out", url, "--no-progress"],
        ["merge", url, str(cache)],
        ["export", str(cache), url, "--no-progress"],
    ]
    for argv in commands:
        assert kdcache_cli.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("read-only" in err or "pip install gcsfs" in err), err
    assert not list(work.iterdir()) and not (tmp_path / "staging").exists()


# ---- merge and export to s3 -----------------------------------------------------------------------


def test_merge_to_s3_killed_mid_upload_resumes(store, cache, tmp_path, monkeypatch):
    fs, bucket = store
    url = f"{bucket}/merged"
    local = tmp_path / "local-merge"
    merge_caches(local, [str(cache)])
    spy = Uploads(monkeypatch, die_after=2)
    with pytest.raises(Killed):
        merge_caches(url, [str(cache)])
    assert not fs.exists("kd-bucket/merged/manifest.json")  # nothing claims completeness yet
    damaged = spy.sent[0]
    # A damaged object under a finished name: the rerun must not trust it (its sha256 differs).
    fs.pipe(f"kd-bucket/merged/{damaged}", b"\0" * fs.size(f"kd-bucket/merged/{damaged}"))
    spy.sent, spy.die_after = [], None
    merge_caches(url, [str(cache)])
    assert damaged in spy.sent and spy.sent[-1] == "manifest.json"
    verify_cache(url)
    assert rows(url) == rows(local)
    assert not staging_dir(url).exists()
    with pytest.raises(InputError, match="already holds a complete cache"):
        merge_caches(url, [str(cache)])


def test_export_to_s3_resumes_and_matches_a_local_export(store, cache, tmp_path, monkeypatch):
    fs, bucket = store
    url = f"{bucket}/exported"
    local = export_cache(cache, tmp_path / "local-export", rows_per_file=7, progress=False)
    spy = Uploads(monkeypatch, die_after=2)
    with pytest.raises(Killed):
        export_cache(cache, url, rows_per_file=7, progress=False)
    sent = spy.sent
    assert sent == ["part-00000.parquet", "part-00001.parquet"] and not fs.exists("kd-bucket/exported/_export.json")
    spy.die_after = None
    record = export_cache(cache, url, rows_per_file=7, progress=False)
    assert record == local
    # the parts uploaded before the kill were found complete and not sent again; _export.json came last
    assert sent[2:] == [*(f["file"] for f in local["files"][2:]), "_export.json"]
    for part in local["files"]:
        assert fs.cat(f"kd-bucket/exported/{part['file']}") == (tmp_path / "local-export" / part["file"]).read_bytes()
    # finished: a rerun uploads nothing; other settings are refused
    del sent[:]
    assert export_cache(cache, url, rows_per_file=7, progress=False) == local and sent == []
    with pytest.raises(InputError, match="another export"):
        export_cache(cache, url, rows_per_file=5, progress=False)


def test_merge_never_clears_a_staging_folder_holding_other_files(store, cache, tmp_path):
    fs, bucket = store
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="holds files a merge does not write"):
        merge_caches(f"{bucket}/m", [str(cache)], staging=mine)
    assert (mine / "thesis.tex").read_text() == "years of work" and not fs.exists("kd-bucket/m")


def test_a_prefix_with_other_files_is_refused_before_work(store, cache):
    fs, bucket = store
    fs.pipe("kd-bucket/data/notes.txt", b"someone else's")
    for run in (
        lambda: merge_caches(f"{bucket}/data", [str(cache)]),
        lambda: export_cache(cache, f"{bucket}/data", progress=False),
    ):
        with pytest.raises(InputError, match="is not empty"):
            run()
    assert fs.cat("kd-bucket/data/notes.txt") == b"someone else's"


# ---- the cache writer's mirror (CacheUpload), without a teacher -------------------------------------


def write_through(upload: CacheUpload | None, examples, stop_at: int | None = None, folder=None) -> None:
    """What `kdcache cache --out URL` does with the writer: open the store, write the staging folder, finish
    (upload=None: a local job into `folder`). stop_at: the job dies (Killed) there, once the mirror caught up."""
    if upload is not None:
        upload.open()
        folder = upload.staging
    with CacheWriter(folder, codec=CodecConfig(k=8), provenance=PROVENANCE, **LAYOUT) as w:
        for i, ex in enumerate(examples):
            if ex.id in w.done_ids:
                continue
            if i == stop_at:
                upload.sync()
                raise Killed("the job died")
            w.write(ex)
            if i % 5 == 4:
                w.reject(f"bad-{i}", "no_assistant_turn: none")
    if upload is not None:
        upload.finish()


LAYOUT = {"row_group_positions": 64, "shard_max_bytes": 1}  # a shard per row group


@pytest.mark.parametrize("staging_survives", [True, False])
def test_the_mirror_resumes_from_staging_or_from_the_store(staging_survives, store, examples, tmp_path):
    """Killed mid-job with a shard on the store damaged: the rerun (with its staging folder, or on a machine
    without it) trusts no damaged object, redoes what it must and ends with a cache equal to a local one."""
    fs, bucket = store
    url = f"{bucket}/mirrored"
    with pytest.raises(Killed):
        write_through(CacheUpload(url), examples, stop_at=25)
    listed = {p.split("mirrored/", 1)[1] for p in fs.find("kd-bucket/mirrored")}
    shards = sorted(n for n in listed if n.endswith(".parquet"))
    assert "_progress/job.json" in listed and "manifest.json" not in listed and len(shards) >= 3
    assert {f"_progress/{n}.json" for n in shards} <= listed  # each shard's sidecar followed it
    fs.pipe(f"kd-bucket/mirrored/{shards[1]}", b"\0" * fs.size(f"kd-bucket/mirrored/{shards[1]}"))
    if not staging_survives:
        shutil.rmtree(staging_dir(url))
    write_through(CacheUpload(url), examples)
    write_through(None, examples, folder=tmp_path / "local")
    verify_cache(url)
    assert rows(url) == rows(tmp_path / "local")
    assert not [n for n in fs.find("kd-bucket/mirrored") if "_progress" in n] and not staging_dir(url).exists()


def test_hostile_progress_records_on_the_store_are_not_trusted(store, examples, tmp_path):
    """What a restore reads from the store is untrusted: a record of the wrong types, one naming a shard whose
    bytes differ, a record that is not JSON: each shard is redone, nothing of it reaches the cache."""
    fs, bucket = store
    url = f"{bucket}/hostile"
    with pytest.raises(Killed):
        write_through(CacheUpload(url), examples, stop_at=10)
    shutil.rmtree(staging_dir(url))
    root = "kd-bucket/hostile"
    fs.pipe(f"{root}/part-09997.parquet", b"PAR1 not a shard")
    fs.pipe(f"{root}/_progress/part-09997.parquet.json", b'{"bytes": "many", "sha256": 5, "ids": ["ex0"]}')
    fs.pipe(f"{root}/part-09998.parquet", b"PAR1 other bytes")
    fs.pipe(f"{root}/_progress/part-09998.parquet.json", b'{"bytes": 16, "sha256": "' + b"0" * 64 + b'"}')
    fs.pipe(f"{root}/part-09999.parquet", b"x")
    fs.pipe(f"{root}/_progress/part-09999.parquet.json", b'{"bytes": 1, "sha256": NaN}')
    write_through(CacheUpload(url), examples)
    write_through(None, examples, folder=tmp_path / "local")
    verify_cache(url)
    assert rows(url) == rows(tmp_path / "local")
    assert not [p for p in fs.find(root) if "part-0999" in p]


def test_a_bucket_that_cannot_be_written_stops_the_job_when_it_claims_the_prefix(store, examples):
    """The claim (job.json) is uploaded when the writer opens the staging folder, before run_cache's teacher
    starts: a missing bucket is one line then, not after the whole job."""
    upload = CacheUpload("s3://no-such-bucket-kd/c")
    assert upload.open() is None
    with pytest.raises(InputError, match="cannot upload _progress/job.json") as info:
        with CacheWriter(upload.staging, codec=CodecConfig(k=8), provenance=PROVENANCE):
            upload.start()
    assert "\n" not in str(info.value) and upload._thread is None


def test_a_store_with_files_of_its_own_is_not_written(store, examples):
    fs, bucket = store
    fs.pipe("kd-bucket/theirs/data.csv", b"a,b\n")
    with pytest.raises(InputError, match="is not empty"):
        CacheUpload(f"{bucket}/theirs").open()
    assert fs.find("kd-bucket/theirs") == ["kd-bucket/theirs/data.csv"]


# ---- kdcache cache --out s3://, SIGKILLed mid-run ------------------------------------------------

# The job, SIGKILLed right after its second shard reaches the store (before that shard's sidecar): the
# writer waits after each shard until the mirror has uploaded it with its sidecar, so the point of the kill
# does not depend on how fast the teacher is.
_KILL_AFTER_SHARD_UPLOADS = """
import os, signal, sys, time
from formats.remote_write import Remote
from formats.writer import CacheWriter
import kdcache.cli as kdcache_cli
AT, ARGS, sent = int(sys.argv[1]), sys.argv[2:], []
put, close = Remote.put, CacheWriter._close_shard
def put_then_die(self, local, name):
    put(self, local, name)
    sent.append(name.rsplit("/", 1)[-1])
    if sum(n.endswith(".parquet") for n in sent) == AT:
        os.kill(os.getpid(), signal.SIGKILL)
def close_then_wait(self):
    name = self._open.name
    close(self)
    deadline = time.monotonic() + 120
    while name + ".json" not in sent and time.monotonic() < deadline:
        time.sleep(0.02)
Remote.put, CacheWriter._close_shard = put_then_die, close_then_wait
sys.exit(kdcache_cli.main(ARGS))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_cache_to_s3_sigkill_rerun_verifies_and_equals_a_local_run(
    store, tiny_dir, sample_rows, tmp_path, monkeypatch, capsys
):
    fs, bucket = store
    url = f"{bucket}/caches/c"
    data = write_jsonl(tmp_path / "in.jsonl", sample_rows[:6] + [{"id": "bad"}])
    common = ["cache", "--teacher", str(tiny_dir), "--engine", "hf", "--dtype", "float32", "--dataset", str(data)]
    common += ["--k", "8", "--max-length", "128", "--batch-size", "1", "--row-group-positions", "40"]
    common += ["--shard-max-bytes", "1", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_SHARD_UPLOADS, "2", *common, "--out", url],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    listed = [p.split("caches/c/", 1)[1] for p in fs.find("kd-bucket/caches/c")]
    assert "_progress/job.json" in listed and "manifest.json" not in listed
    assert len([n for n in listed if n.endswith(".parquet")]) == 2
    # The machine is gone with its staging folder: the rerun restores the committed shards from the store.
    staged = staging_dir(url)
    assert staged.is_dir()
    shutil.rmtree(staged)
    assert kdcache_cli.main([*common, "--out", url]) == 0
    report = capsys.readouterr().out
    resumed = int(report.split(" written, ")[1].split(" done by an earlier run")[0].split(", ")[-1])
    assert resumed > 0, report
    listed = [p.split("caches/c/", 1)[1] for p in fs.find("kd-bucket/caches/c")]
    assert not [n for n in listed if n.startswith("_progress/")] and not staged.exists()
    assert kdcache_cli.main(["verify", url]) == 0
    assert kdcache_cli.main([*common, "--out", str(tmp_path / "local")]) == 0
    assert rows(url) == rows(tmp_path / "local")
    # finished: a rerun loads no teacher and uploads nothing
    import cache_teacher.engines.factory as factory

    monkeypatch.setattr(factory, "load_engine", lambda *a, **k: pytest.fail("a finished cache started the teacher"))
    monkeypatch.setattr(Remote, "put", lambda *a, **k: pytest.fail("a finished cache was uploaded again"))
    assert kdcache_cli.main([*common, "--out", url]) == 0
    assert "7 done by an earlier run" in capsys.readouterr().out
