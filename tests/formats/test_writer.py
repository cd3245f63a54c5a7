import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from .format_helpers import PROVENANCE, assert_same_topk, make_example, write_cache

from formats import CacheReader, CacheWriter, CodecConfig, load_manifest
from formats.errors import InputError
from formats.tools import verify_cache

HERE = Path(__file__).parent


def _run_writer(out, seed, kill_after_shards=None):
    """Run _write_slowly.py; with kill_after_shards it SIGKILLs itself once that many shards exist."""
    cmd = [sys.executable, str(HERE / "_write_slowly.py"), str(out), str(seed), str(HERE)]
    if kill_after_shards is not None:
        cmd.append(str(kill_after_shards))
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(HERE.parents[1])}, timeout=120)
    assert proc.returncode == (0 if kill_after_shards is None else -signal.SIGKILL)


@pytest.mark.multiprocess
def test_killed_writer_resumes_to_the_same_rows(tmp_path, seed):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    _run_writer(killed, seed, kill_after_shards=2)
    assert not (killed / "manifest.json").exists()
    with pytest.raises(Exception, match="rerun the same command"):
        load_manifest(killed)
    _run_writer(killed, seed)  # the same command again resumes
    _run_writer(clean, seed)
    verify_cache(killed)
    a = {ex.id: ex for ex in CacheReader(killed)}
    b = {ex.id: ex for ex in CacheReader(clean)}
    assert sorted(a) == sorted(b) and len(a) == 60
    for key in a:
        assert_same_topk(a[key].topk_ids, a[key].topk_logprobs, b[key].topk_ids)  # tie order: each shard's codes
        np.testing.assert_array_equal(a[key].input_ids, b[key].input_ids)
        np.testing.assert_array_equal(a[key].topk_logprobs, b[key].topk_logprobs)
    rejects = [json.loads(line)["id"] for line in (killed / "rejects.jsonl").read_text().splitlines()]
    assert sorted(rejects) == sorted(f"bad-{i}" for i in range(60) if i % 7 == 3)
    assert load_manifest(killed)["counts"]["rejects"] == len(rejects)
    assert not list(killed.glob(".*")) and not (killed / "_progress").exists()


def test_every_record_is_written_or_rejected(tmp_path, rng):
    examples = [make_example(rng, i) for i in range(10)]
    m = write_cache(
        tmp_path / "c", examples, rejects=[("x", "empty assistant content"), ("y", "too long: 9000 > 4096")]
    )
    assert m["counts"]["examples"] == 10 and m["counts"]["rejects"] == 2
    assert m["counts"]["rejects_by_reason"] == {"empty assistant content": 1, "too long": 1}
    assert {s["file"] for s in m["shards"]} == {p.name for p in (tmp_path / "c").glob("*.parquet")}


def test_duplicate_ids_and_bad_examples_are_refused(tmp_path, rng):
    ex = make_example(rng, 0)
    with CacheWriter(tmp_path / "c", codec=CodecConfig(k=8), provenance=PROVENANCE) as w:
        w.write(ex)
        with pytest.raises(InputError, match="duplicate id"):
            w.write(ex)
        bad = make_example(rng, 1)
        bad.target_positions = bad.target_positions.copy()
        bad.target_positions[-1] = len(bad.input_ids)  # nothing follows the last token
        with pytest.raises(ValueError, match="must lie in"):
            w.write(bad)


def test_resume_with_other_settings_is_refused(tmp_path, rng):
    path = tmp_path / "c"
    w = CacheWriter(path, codec=CodecConfig(k=8), provenance=PROVENANCE)
    w.write(make_example(rng, 0))  # never finished: an interrupted job
    with pytest.raises(InputError, match="codec"):
        CacheWriter(path, codec=CodecConfig(k=4), provenance=PROVENANCE)


def test_complete_cache_reopens_as_done(tmp_path, rng):
    examples = [make_example(rng, i) for i in range(5)]
    write_cache(tmp_path / "c", examples, rejects=[("r", "no assistant turn")])
    w = CacheWriter(tmp_path / "c", codec=CodecConfig(k=8), provenance=PROVENANCE)
    assert w.complete and w.done_ids == {e.id for e in examples} | {"r"}
    with pytest.raises(InputError, match="already complete"):
        w.write(make_example(rng, 9))
    with pytest.raises(InputError, match="complete cache"):
        CacheWriter(tmp_path / "c", codec=CodecConfig(k=8), provenance=PROVENANCE, resume=False)


def test_shards_roll_at_the_size_bound(tmp_path, rng):
    examples = [make_example(rng, i, min_len=30, max_len=40) for i in range(30)]
    m = write_cache(tmp_path / "c", examples, shard_max_bytes=5000, row_group_positions=32)
    assert len(m["shards"]) > 2
    for shard in m["shards"]:  # a shard closes at the first row group that takes its data past the bound
        meta = pq.ParquetFile(tmp_path / "c" / shard["file"]).metadata
        groups = [
            sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
            for g in range(meta.num_row_groups)
        ]
        assert sum(groups) - groups[-1] < 5000


def test_the_hot_table_is_in_the_footer_once_and_older_shards_still_read(tmp_path, rng):
    """pyarrow copies a schema's metadata into the footer's serialized Arrow schema too: the writer adds the
    kdcache key to the footer alone (issue 24 item 3). A shard written the old way (the key in both) reads."""
    import base64

    examples = [make_example(rng, i, min_len=30, max_len=40) for i in range(8)]
    m = write_cache(tmp_path / "c", examples, shard_max_bytes=1 << 20)
    path = tmp_path / "c" / m["shards"][0]["file"]
    pf = pq.ParquetFile(path)
    meta = json.loads(pf.metadata.metadata[b"kdcache"])
    assert b"kdcache" not in (pf.schema_arrow.metadata or {})  # not in ARROW:schema
    hot = meta["hot_table"].encode()
    arrow_schema = pf.metadata.metadata[b"ARROW:schema"]  # base64 of the serialized Arrow schema
    assert len(base64.b64decode(hot)) > 0 and len(arrow_schema) < len(hot)
    before = [(e.id, e.topk_ids.tolist(), e.topk_logprobs.tolist()) for e in CacheReader(tmp_path / "c")]

    from .format_helpers import rewrite_shard

    old = pq.read_table(path).replace_schema_metadata({b"kdcache": json.dumps(meta).encode()})
    rewrite_shard(tmp_path / "c", 0, edit_table=lambda table: old)  # the old layout: the key in both places
    assert b"kdcache" in pq.ParquetFile(path).schema_arrow.metadata
    assert len(pq.ParquetFile(path).metadata.metadata[b"ARROW:schema"]) > len(hot)  # the table again in there
    assert [(e.id, e.topk_ids.tolist(), e.topk_logprobs.tolist()) for e in CacheReader(tmp_path / "c")] == before
    assert verify_cache(tmp_path / "c")["shards"] == 1


# ---- resume: names, settings, accounting (issue 9) ------------------------------------------


def _rows(path) -> dict:
    return {
        ex.id: (ex.input_ids, ex.target_positions, ex.topk_ids, ex.topk_logprobs, ex.target_logprobs, ex.target_ranks)
        for ex in CacheReader(path, prefetch=0)
    }


def _assert_same_rows(a, b) -> None:
    ra, rb = _rows(a), _rows(b)
    assert sorted(ra) == sorted(rb)
    for key in ra:
        for x, y in zip(ra[key], rb[key]):
            np.testing.assert_array_equal(x, y)


def _crash_after_shards(path, examples, shards: int, **kw) -> None:
    """Write until `shards` shards are published, then drop the writer as a killed process would."""
    w = CacheWriter(path, codec=CodecConfig(k=8), provenance=PROVENANCE, **kw)
    for ex in examples:
        w.write(ex)
        if len(list(path.glob("*.parquet"))) >= shards:
            return
    raise AssertionError("the examples did not fill enough shards")


def _resume(path, examples, provenance=PROVENANCE, **kw) -> dict:
    with CacheWriter(path, codec=CodecConfig(k=8), provenance=provenance, **kw) as w:
        for ex in examples:
            if ex.id not in w.done_ids:
                w.write(ex)
    return w.manifest


def test_a_damaged_middle_shard_is_redone_under_a_new_name(tmp_path):
    rng = np.random.default_rng(6)
    examples = [make_example(rng, i, min_len=30, max_len=40) for i in range(30)]
    kw = dict(row_group_positions=32, shard_max_bytes=3000)
    path = tmp_path / "c"
    _crash_after_shards(path, examples, 3, **kw)
    shard = path / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damaged on disk after it was committed
    shard.write_bytes(bytes(data))
    kept = {p.name: p.read_bytes() for p in path.glob("*.parquet") if p != shard}
    m = _resume(path, examples, **kw)
    names = [s["file"] for s in m["shards"]]
    assert len(names) == len(set(names)), f"a shard name is listed twice: {names}"
    assert all((path / name).read_bytes() == data for name, data in kept.items())  # kept shards untouched
    verify_cache(path)
    write_cache(tmp_path / "clean", examples, **kw)
    _assert_same_rows(path, tmp_path / "clean")


@pytest.mark.parametrize("finished", [False, True], ids=["unfinished", "finished"])
def test_resume_with_other_settings_names_what_differs(tmp_path, finished):
    rng = np.random.default_rng(7)
    path = tmp_path / "c"
    sampling = {"n": 2, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 16, "seed": 0}
    prov = {**PROVENANCE, "mode": "generate", "sampling": sampling, "template": {"max_length": 256}}
    w = CacheWriter(path, codec=CodecConfig(k=8), provenance=prov)
    w.write(make_example(rng, 0))
    if finished:
        w.finish()
    changed = {
        **prov,
        "sampling": {**sampling, "temperature": 1.0},
        "teacher": {**prov["teacher"], "name_or_path": "B"},
    }
    with pytest.raises(InputError) as info:
        CacheWriter(path, codec=CodecConfig(k=16), provenance=changed)
    message = str(info.value)
    for key in ("codec.k: 8 -> 16", "sampling.temperature: 0.7 -> 1.0", "teacher.name_or_path: 'unit-teacher' -> 'B'"):
        assert key in message
    assert "new folder" in message and "delete" in message
    assert CacheWriter(path, codec=CodecConfig(k=8), provenance=prov).complete == finished  # the same settings resume


@pytest.mark.parametrize("finished", [False, True], ids=["unfinished", "finished"])
def test_a_cache_recorded_before_the_teachers_weight_hashes_resumes_but_other_weights_are_refused(tmp_path, finished):
    """A cache (or job) from before kdcache recorded teacher.weight_files / weights_sha256 / commit
    reruns with the same command; once they are recorded, other weights are other settings."""
    rng = np.random.default_rng(7)
    path = tmp_path / "c"
    w = CacheWriter(path, codec=CodecConfig(k=8), provenance=PROVENANCE)  # none of the three recorded
    w.write(make_example(rng, 0))
    if finished:
        w.finish()
    hashed = {"weights_sha256": "a" * 64, "weight_files": {"model.safetensors": "b" * 64}, "commit": "c" * 40}
    now = {**PROVENANCE, "teacher": {**PROVENANCE["teacher"], **hashed}}
    if not finished:
        w = CacheWriter(path, codec=CodecConfig(k=8), provenance=now)  # resumes, and now records them
        w.write(make_example(rng, 1))
        w.finish()
        assert load_manifest(path)["teacher"]["weights_sha256"] == "a" * 64
    else:
        assert CacheWriter(path, codec=CodecConfig(k=8), provenance=now).complete
        return
    other = {**now, "teacher": {**now["teacher"], "weights_sha256": "d" * 64}}
    with pytest.raises(InputError, match="teacher.weights_sha256: 'aaaa.*' -> 'dddd.*'"):
        CacheWriter(path, codec=CodecConfig(k=8), provenance=other)


def test_no_resume_refuses_an_existing_cache_and_says_so(tmp_path, rng):
    write_cache(tmp_path / "c", [make_example(rng, 0)])
    with pytest.raises(InputError, match="already holds a complete cache.*new folder.*delete"):
        CacheWriter(tmp_path / "c", codec=CodecConfig(k=8), provenance=PROVENANCE, resume=False)


def test_a_new_job_refuses_a_folder_with_other_files(tmp_path, rng):
    path = tmp_path / "data"
    path.mkdir()
    (path / "mine.parquet").write_bytes(b"not yours")
    with pytest.raises(InputError, match="not empty"):
        CacheWriter(path, codec=CodecConfig(k=8), provenance=PROVENANCE)
    assert (path / "mine.parquet").read_bytes() == b"not yours"


def test_finish_checks_and_records_the_input_count(tmp_path):
    rng = np.random.default_rng(9)
    with CacheWriter(tmp_path / "ok", codec=CodecConfig(k=8), provenance=PROVENANCE) as w:
        w.write(make_example(rng, 0))
        w.reject("r", "no_assistant_turn: x")
        w.inputs = 2
    assert load_manifest(tmp_path / "ok")["counts"]["inputs"] == 2
    verify_cache(tmp_path / "ok")
    w = CacheWriter(tmp_path / "lost", codec=CodecConfig(k=8), provenance=PROVENANCE)
    w.write(make_example(rng, 1))
    w.inputs = 3  # one input was neither written nor rejected
    with pytest.raises(InputError, match="1 example.* 0 rejects.* 3 inputs"):
        w.finish()
    assert not (tmp_path / "lost" / "manifest.json").exists()


def test_verify_checks_the_accounting(tmp_path, rng):
    from formats.errors import FormatError

    path = tmp_path / "c"
    with CacheWriter(path, codec=CodecConfig(k=8), provenance=PROVENANCE) as w:
        w.write(make_example(rng, 0))
        w.inputs = 1
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["counts"]["inputs"] = 2
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="manifest.json.*1 examples \\+ 0 rejects.*2 inputs"):
        verify_cache(path)


def test_a_crash_after_the_manifest_leaves_no_progress_folder(tmp_path, rng):
    examples = [make_example(rng, i) for i in range(5)]
    write_cache(tmp_path / "c", examples)
    (tmp_path / "c" / "_progress").mkdir()  # killed between writing the manifest and removing _progress
    (tmp_path / "c" / "_progress" / "job.json").write_text("{}")
    (tmp_path / "c" / "rejects.jsonl.tmp").write_text("")
    _resume(tmp_path / "c", examples)
    assert not (tmp_path / "c" / "_progress").exists() and not list((tmp_path / "c").glob("*.tmp"))


def test_damaged_progress_files_are_redone_or_named(tmp_path):
    from formats.errors import FormatError

    rng = np.random.default_rng(10)
    examples = [make_example(rng, i, min_len=30, max_len=40) for i in range(20)]
    kw = dict(row_group_positions=32, shard_max_bytes=3000)
    path = tmp_path / "c"
    _crash_after_shards(path, examples, 2, **kw)
    (path / "_progress" / "part-00000.parquet.json").write_text('{"file": "part-00000.parquet", "rows"')  # torn
    (path / "_progress" / "part-00001.parquet.json").write_text("[]")  # not a commit record
    _resume(path, examples, **kw)  # both shards are redone
    verify_cache(path)
    write_cache(tmp_path / "clean", examples, **kw)
    _assert_same_rows(path, tmp_path / "clean")

    (path / "rejects.jsonl").write_text('{"id": "x", "reason": "r"}\n{"id": \n')
    with pytest.raises(FormatError, match="rejects.jsonl line 2"):
        CacheWriter(path, codec=CodecConfig(k=8), provenance=PROVENANCE)
    _crash_after_shards(tmp_path / "d", examples, 1, **kw)
    (tmp_path / "d" / "_progress" / "job.json").write_text("{")
    with pytest.raises(FormatError, match="job.json"):
        CacheWriter(tmp_path / "d", codec=CodecConfig(k=8), provenance=PROVENANCE)
