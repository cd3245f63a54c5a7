import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from format_helpers import PROVENANCE, make_example, write_cache

from formats import CacheReader, CacheWriter, CodecConfig, load_manifest
from formats.errors import InputError
from formats.tools import verify_cache

HERE = Path(__file__).parent


def _run_writer(out, seed, kill_after_shards=None):
    cmd = [sys.executable, str(HERE / "_write_slowly.py"), str(out), str(seed), str(HERE)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(HERE.parents[1])})
    if kill_after_shards is None:
        assert proc.wait(timeout=120) == 0
        return
    deadline = time.time() + 60
    while len(list(Path(out).glob("*.parquet"))) < kill_after_shards:
        assert proc.poll() is None, "writer finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_writer_resumes_to_the_same_rows(tmp_path):
    seed = int(np.random.SeedSequence().entropy % 2**31)
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
        np.testing.assert_array_equal(a[key].topk_ids, b[key].topk_ids)
        np.testing.assert_array_equal(a[key].input_ids, b[key].input_ids)
        np.testing.assert_array_equal(a[key].topk_logprobs, b[key].topk_logprobs)
    rejects = [json.loads(line)["id"] for line in (killed / "rejects.jsonl").read_text().splitlines()]
    assert sorted(rejects) == sorted(f"bad-{i}" for i in range(60) if i % 7 == 3)
    assert load_manifest(killed)["counts"]["rejects"] == len(rejects)
    assert not list(killed.glob(".*")) and not (killed / "_progress").exists()


def test_every_record_is_written_or_rejected(tmp_path, rng):
    examples = [make_example(rng, i) for i in range(10)]
    m = write_cache(tmp_path / "c", examples, rejects=[("x", "empty assistant content"), ("y", "too long: 9000 > 4096")])
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
        groups = [sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
                  for g in range(meta.num_row_groups)]
        assert sum(groups) - groups[-1] < 5000
