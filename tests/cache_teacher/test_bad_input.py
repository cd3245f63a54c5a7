"""Bad input never aborts a cache job or leaves a misleading folder (issue 20, items 1-7): each bad record is a
reject with its reason (written + rejected = input records), an unreadable input stops with one line before
any output exists, work per record is bounded by --max-length, one job per folder, operational errors are
one line."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time

import pytest

from cache_teacher.run import run_cache
from formats.errors import InputError
from formats.manifest import load_manifest

from .teacher_helpers import REPO, make_config, write_jsonl

GOOD = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir):
    from cache_teacher.engines.hf_engine import HFEngine

    return HFEngine(make_config(teacher=str(tiny_dir), out="unused"))


def rejects(cache) -> dict[str, str]:
    return {
        r["id"]: r["reason"].split(":")[0] for r in map(json.loads, (cache / "rejects.jsonl").read_text().splitlines())
    }


def cache_of(tiny_dir, engine, dataset, out, **kw):
    return run_cache(make_config(teacher=str(tiny_dir), dataset=str(dataset), out=str(out), **kw), engine=engine)


def test_each_bad_line_is_a_reject_and_the_rest_is_written(tiny_dir, tiny_engine, tmp_path):
    line = lambda rid, messages=GOOD: json.dumps({"id": rid, "messages": messages}).encode()  # noqa: E731
    lines = [
        b"\xef\xbb\xbf" + line("bom-first"),  # a UTF-8 BOM: the first record is read
        b'{"id": "latin1", "messages": [{"role": "user", "content": "caf\xe9"}]}',  # not UTF-8
        line("surrogate", [{"role": "user", "content": "\ud800"}, GOOD[1]]),  # a lone surrogate
        b'{"id": "digits", "n": ' + b"9" * 5000 + b', "messages": []}',  # a 5,000-digit integer
        b'{"id": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # 100k-deep nesting
        line("a"),
        line("a"),
        line("a#dup6"),  # the id given to the duplicate is taken
        line("last"),
    ]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    summary = cache_of(tiny_dir, tiny_engine, path, tmp_path / "c")
    got = rejects(tmp_path / "c")
    assert got.pop("row-000000001") == "invalid_json" and got.pop("row-000000003") == "invalid_json"
    assert got.pop("row-000000004") == "invalid_json" and got.pop("surrogate") == "invalid_text"
    assert got == {"a#dup6": "duplicate_id", "a#dup6#dup7": "duplicate_id"}
    m = load_manifest(tmp_path / "c")
    assert (
        m["counts"]["examples"] == 3
        and m["counts"]["examples"] + m["counts"]["rejects"] == len(lines) == summary.inputs
    )
    from formats.tools import verify_cache

    verify_cache(tmp_path / "c")


@pytest.mark.parametrize(
    "name,data,match",
    [
        (
            "latin1.json",
            json.dumps([{"id": "x", "messages": GOOD}]).replace("Say", "S\u00e9y").encode("latin-1"),
            "not UTF-8",
        ),
        ("broken.json", b'[{"id": "x", "messages": ', "not valid JSON"),
        ("fake.parquet", b"PAR1 but not really", "not a readable Parquet file"),
        ("empty.jsonl", b"", "holds no records"),
        ("blank.jsonl", b"\n\n  \n", "holds no records"),
    ],
)
def test_an_unreadable_input_stops_with_one_line_before_any_output(tiny_dir, tmp_path, name, data, match):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError, match=match):
        cache_of(tiny_dir, None, path, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing a rerun would mistake for a started job


def test_work_per_record_is_bounded_by_max_length(tiny_dir, tiny_engine, tmp_path):
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(200_000)]
    huge = [{"role": "user", "content": "word " * 4_000_000}, {"role": "assistant", "content": "ok"}]
    late = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a " * 600}]
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "many", "messages": many}, {"id": "huge", "messages": huge}, {"id": "late", "messages": late}],
    )
    t0 = time.perf_counter()
    cache_of(tiny_dir, tiny_engine, path, tmp_path / "c", max_length=64)
    assert time.perf_counter() - t0 < 60  # was hours (quadratic in turns) and gigabytes
    assert rejects(tmp_path / "c") == {"huge": "no_trained_tokens"}  # its first 64 tokens are the user's
    from formats import CacheReader

    got = {ex.id: ex for ex in CacheReader(tmp_path / "c")}
    assert len(got["many"].input_ids) == 64 and got["many"].meta["truncated"]
    assert len(got["many"].meta["messages"]) <= 64  # the conversation stored is the one its tokens render
    assert len(got["late"].input_ids) == 64


def test_two_jobs_on_one_folder(tiny_dir, tiny_engine, tmp_path):
    """A second job on a folder another process is writing stops at once, naming the holder; once the
    holder is gone (it ended, or was killed: the kernel drops its lock) the folder is free."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "x", "messages": GOOD}])
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from formats.safe_write import FolderLock; "
            f"lock = FolderLock({str(tmp_path / 'c')!r}); print('locked', flush=True); sys.stdin.read()",
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"is being written by pid {holder.pid} on "):
            cache_of(tiny_dir, tiny_engine, path, tmp_path / "c")
    finally:
        holder.kill()
        holder.wait()
    cache_of(tiny_dir, tiny_engine, path, tmp_path / "c")  # a killed holder leaves no stale lock
    assert not (tmp_path / "c" / ".kdcache-lock").exists()
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.suffix == ".parquet") == ["part-00000.parquet"]


def test_an_object_store_out_or_a_file_out_is_refused_before_anything_is_created(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "x", "messages": GOOD}])
    with pytest.raises(InputError, match="read-only"):  # a store kdcache can write: tests/formats/test_remote_write.py
        cache_of(tiny_dir, None, path, "https://example.org/c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        cache_of(tiny_dir, None, path, tmp_path / "afile")


def test_an_unreachable_hub_dataset_is_one_line_and_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdcache.cli",
            "cache",
            "--teacher",
            str(tiny_dir),
            "--dataset",
            "no-such-org/no-such-dataset",
            "--out",
            str(tmp_path / "c"),
            "--engine",
            "hf",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cannot load dataset 'no-such-org/no-such-dataset'" in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr
    assert not (tmp_path / "c").exists()


def test_a_file_size_limit_is_one_line_and_leaves_nothing_a_rerun_trusts(tmp_path, rng):
    """A real EFBIG (RLIMIT_FSIZE) during `kdcache merge`: one line naming the file and the fix; the
    half-merged folder is removed, so the rerun (without the limit) starts clean."""
    from tests.formats.format_helpers import make_example, write_cache

    write_cache(tmp_path / "w0", [make_example(rng, i) for i in range(40)])

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    args = [sys.executable, "-m", "kdcache.cli", "merge", str(tmp_path / "m"), str(tmp_path / "w0")]
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120, preexec_fn=limit)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "File too large" in r.stderr and "ulimit -f" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
    assert subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120).returncode == 0
