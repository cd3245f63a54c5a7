import json
import os
import subprocess
import sys

import numpy as np
import pytest
from format_helpers import PROVENANCE, make_example, write_cache

from formats import CacheReader, load_manifest
from formats.errors import ChecksumError, FormatError, IncompatibleCachesError, InputError
from formats.tools import merge_caches, verify_cache


def kdcache(*args):
    return subprocess.run([sys.executable, "-m", "kdcache_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def test_verify_passes_a_good_cache(cache):
    r = kdcache("verify", cache)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_single_byte_corruption_is_caught_everywhere(cache, rng):
    for shard in load_manifest(cache)["shards"]:
        path = cache / shard["file"]
        original = path.read_bytes()
        for offset in sorted(set(rng.integers(0, len(original), 4).tolist()) | {0, len(original) - 1}):
            data = bytearray(original)
            data[offset] ^= 0xFF
            path.write_bytes(bytes(data))
            with pytest.raises(ChecksumError, match=shard["file"]):
                verify_cache(cache)
        path.write_bytes(original)
    verify_cache(cache)


def test_cli_names_the_bad_shard(cache):
    shard = load_manifest(cache)["shards"][1]["file"]
    with open(cache / shard, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    r = kdcache("verify", cache)
    assert r.returncode == 1
    assert shard in r.stderr and "sha256" in r.stderr and "Traceback" not in r.stderr


def test_truncated_and_missing_shards(cache):
    shards = load_manifest(cache)["shards"]
    first = cache / shards[0]["file"]
    first.write_bytes(first.read_bytes()[:-10])
    with pytest.raises(ChecksumError, match="truncated"):
        verify_cache(cache)
    with pytest.raises(FormatError, match="Parquet|read"):
        list(CacheReader(cache))
    (cache / shards[1]["file"]).unlink()
    manifest = load_manifest(cache)
    manifest["shards"] = manifest["shards"][1:]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="missing"):
        verify_cache(cache)


def test_value_checks_name_shard_and_row(tmp_path, rng):
    exs = [make_example(rng, i) for i in range(5)]
    exs[3].topk_ids = exs[3].topk_ids.copy()
    exs[3].topk_ids[0, 0] = 999
    exs[3].topk_ids[0, 1] = 999  # the same id twice
    write_cache(tmp_path / "c", exs, row_group_positions=10**6, shard_max_bytes=10**9)
    with pytest.raises(FormatError, match=r"part-00000.parquet, row 3 \(id 'ex3'\).*listed twice"):
        verify_cache(tmp_path / "c")


def test_unknown_version_and_escaping_shard_names(cache):
    m = load_manifest(cache)
    (cache / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(FormatError, match="format version 99 is not supported"):
        CacheReader(cache)
    r = kdcache("inspect", cache)
    assert r.returncode == 1 and "upgrade kdcache" in r.stderr
    bad = dict(m)
    bad["shards"] = [dict(m["shards"][0], file="../../etc/passwd")] + m["shards"][1:]
    (cache / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="outside the cache folder"):
        verify_cache(cache)


def test_merge_equals_one_cache(tmp_path, rng):
    exs = [make_example(rng, i) for i in range(20)]
    write_cache(tmp_path / "a", exs[:12], rejects=[("r1", "no assistant turn")])
    write_cache(tmp_path / "b", exs[12:], rejects=[("r2", "no assistant turn")])
    m = merge_caches(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    verify_cache(tmp_path / "m")
    assert m["counts"]["examples"] == 20 and m["counts"]["rejects"] == 2
    assert sorted(e.id for e in CacheReader(tmp_path / "m")) == sorted(e.id for e in exs)
    assert len(m["merged_from"]) == 2


def test_merge_refusals(tmp_path, rng):
    exs = [make_example(rng, i) for i in range(6)]
    write_cache(tmp_path / "a", exs[:3])
    write_cache(tmp_path / "overlap", exs[2:])
    other_tok = {**PROVENANCE, "tokenizer": {**PROVENANCE["tokenizer"], "fingerprint": "zzz"}}
    write_cache(tmp_path / "tok", exs[3:], provenance=other_tok)
    other_teacher = {**PROVENANCE, "teacher": {**PROVENANCE["teacher"], "name_or_path": "other"}}
    write_cache(tmp_path / "teacher", exs[3:], provenance=other_teacher)
    write_cache(tmp_path / "k4", exs[3:], k=4)
    for name, what in [("tok", "tokenizer.fingerprint"), ("teacher", "teacher.name_or_path"), ("k4", "codec")]:
        with pytest.raises(IncompatibleCachesError, match=what):
            merge_caches(tmp_path / f"m-{name}", [tmp_path / "a", tmp_path / name])
        assert not (tmp_path / f"m-{name}").exists()
    with pytest.raises(IncompatibleCachesError, match="'ex2' is in both"):
        merge_caches(tmp_path / "m-overlap", [tmp_path / "a", tmp_path / "overlap"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        merge_caches(tmp_path / "full", [tmp_path / "a"])
    r = kdcache("merge", tmp_path / "m-cli", tmp_path / "a", tmp_path / "tok")
    assert r.returncode == 1 and "tokenizer.fingerprint differs" in r.stderr


def test_inspect_shows_summary_and_example(cache):
    r = kdcache("inspect", cache, "--example", "ex3", "--top", "3")
    assert r.returncode == 0, r.stderr
    assert "examples" in r.stdout and "unit-teacher" in r.stdout and "id ex3" in r.stdout
    r = kdcache("inspect", cache, "--example", "nope")
    assert r.returncode == 1 and "no example with id 'nope'" in r.stderr
