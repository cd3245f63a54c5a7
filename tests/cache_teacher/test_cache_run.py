"""cache_teacher.run end to end on a tiny random Llama with the hf engine: accounting, resume after
SIGKILL, worker slices + merge, dry run, generate mode + export-sft."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from cache_teacher.data import validate
from cache_teacher.export_sft import export_sft, iter_cache
from cache_teacher.run import dry_run, run_cache
from formats.manifest import load_manifest
from formats.tools import verify_cache

from teacher_helpers import REPO, make_config, write_jsonl


def read(path) -> dict:
    return {ex.id: ex for ex in iter_cache(path)}


def rejects(path) -> dict:
    lines = (path / "rejects.jsonl").read_text().splitlines()
    return {r["id"]: r["reason"].split(":")[0] for r in map(json.loads, lines)}


def assert_same_cache(a, b, atol=0.05):
    ea, eb = read(a), read(b)
    assert sorted(ea) == sorted(eb)
    for key, x in ea.items():
        y = eb[key]
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.target_positions, y.target_positions)
        assert np.mean(x.topk_ids[:, 0] == y.topk_ids[:, 0]) >= 0.99
        assert np.allclose(x.target_logprobs, y.target_logprobs, atol=atol)
    assert rejects(a) == rejects(b)


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir):
    from cache_teacher.engines.hf_engine import HFEngine

    return HFEngine(make_config(teacher=str(tiny_dir), out="unused"))


@pytest.fixture(scope="module")
def rows_path(sample_rows, tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("rows") / "rows.jsonl", sample_rows[:24])


def test_every_input_is_written_or_rejected(tiny_dir, tiny_engine, sample_rows, tmp_path):
    bad = [
        {"id": "no-messages"},
        {"id": "no-assistant", "messages": [{"role": "user", "content": "hi"}]},
        {"id": "empty", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"id": "int-content", "messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]},
        {"id": "bad-role", "messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ]
    by_length = sorted(sample_rows, key=lambda r: sum(len(m["content"]) for m in r["messages"]))
    rows = by_length[:6] + bad + [{**by_length[-1], "id": "overlong"}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    config = make_config(teacher=str(tiny_dir), dataset=str(path), out=str(tmp_path / "cache"), length_policy="drop",
                         max_length=512)
    summary = run_cache(config, engine=tiny_engine)
    manifest = load_manifest(tmp_path / "cache")
    got = rejects(tmp_path / "cache")
    assert got == {"no-messages": "missing_messages", "no-assistant": "no_assistant_turn",
                   "empty": "empty_assistant_content", "int-content": "non_string_content",
                   "bad-role": "unknown_role", "overlong": "too_long"}
    assert manifest["counts"]["examples"] + manifest["counts"]["rejects"] == len(rows) == summary.inputs
    assert manifest["counts"]["positions"] == summary.positions == summary.cache_positions
    assert manifest["teacher"]["engine"] == "hf" and manifest["tokenizer"]["fingerprint"]
    assert "too_long" in summary.report()
    # the dry run predicts the same counts without the teacher
    dry = dry_run(config)
    assert (dry.examples, dry.positions, sum(dry.rejects.values())) == (6, summary.positions, 6)
    # rerunning a finished cache changes nothing and starts no engine
    again = run_cache(config, engine=None)
    assert again.examples == 0 and again.resumed == len(rows)


_KILL_AFTER_SHARDS = """
import os, signal, sys
from formats.writer import CacheWriter
import kdcache_cli
AT, ARGS, published = int(sys.argv[1]), sys.argv[2:], []
close = CacheWriter._close_shard
def close_then_die(self):
    close(self)
    published.append(1)
    if len(published) == AT:
        os.kill(os.getpid(), signal.SIGKILL)
CacheWriter._close_shard = close_then_die
sys.exit(kdcache_cli.main(ARGS))
"""


def test_sigkill_then_rerun_equals_uninterrupted(tiny_dir, tiny_engine, sample_rows, tmp_path):
    rows = sample_rows[:40] + [{"id": "bad"}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    common = ["--teacher", str(tiny_dir), "--engine", "hf", "--dtype", "float32", "--dataset", str(path),
              "--k", "8", "--max-length", "256", "--batch-size", "4", "--row-group-positions", "100",
              "--shard-max-bytes", "1", "--no-progress"]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "kdcache_cli", "cache", *common, "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    # The same command, SIGKILLed by itself right after its third shard is published: a crash at a
    # known point, not at whatever point a polling loop happens to notice.
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_SHARDS, "3", "cache", *common, "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list((out / "_progress").glob("*.parquet.json"))) == 3
    assert not (out / "manifest.json").exists()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done by an earlier run" in done.stdout
    resumed = int(done.stdout.split(" written, ")[1].split(" done by an earlier run")[0].split(", ")[-1])
    assert resumed > 0
    whole = make_config(teacher=str(tiny_dir), dataset=str(path), out=str(tmp_path / "whole"))
    run_cache(whole, engine=tiny_engine)
    assert_same_cache(out, tmp_path / "whole")
    verify_cache(out)
    assert load_manifest(out)["counts"]["examples"] + load_manifest(out)["counts"]["rejects"] == len(rows)


def test_two_workers_and_merge_equal_one_worker(tiny_dir, tiny_engine, rows_path, tmp_path):
    from cache_teacher.launch import merge

    one = make_config(teacher=str(tiny_dir), dataset=str(rows_path), out=str(tmp_path / "one"))
    run_cache(one, engine=tiny_engine)
    parts = []
    for i in range(2):
        c = make_config(teacher=str(tiny_dir), dataset=str(rows_path), out=str(tmp_path / f"w{i}"),
                        num_workers=2, worker_index=i)
        s = run_cache(c, engine=tiny_engine)
        assert s.examples > 0
        parts.append(tmp_path / f"w{i}")
    merge(tmp_path / "merged", parts)
    assert_same_cache(tmp_path / "one", tmp_path / "merged", atol=1e-6)


def test_generate_mode_and_export(tiny_dir, tiny_engine, rows_path, tmp_path):
    config = make_config(teacher=str(tiny_dir), dataset=str(rows_path), out=str(tmp_path / "gen"), mode="generate",
                         n=2, max_examples=3, temperature=0.8, max_new_tokens=16)
    summary = run_cache(config, engine=tiny_engine)
    assert summary.examples == 6
    examples = read(tmp_path / "gen")
    for ex in examples.values():
        assert ex.finish_reason in ("stop", "length")
        assert ex.target_positions[0] == ex.meta["prompt_tokens"] and ex.target_positions[-1] == len(ex.input_ids) - 1
        assert (ex.topk_ids[:, 0] >= 0).all() and ex.num_targets <= 16
    # same seed, same samples
    again = make_config(**{**config.to_dict(), "out": str(tmp_path / "gen2")})
    run_cache(again, engine=tiny_engine)
    assert all(np.array_equal(ex.input_ids, read(tmp_path / "gen2")[key].input_ids) for key, ex in examples.items())
    rerun = run_cache(config, engine=tiny_engine)  # a finished generate-mode cache: nothing to do
    assert rerun.examples == 0 and rerun.resumed == 3
    n = export_sft(tmp_path / "gen", tmp_path / "sft.jsonl", keep_length=True)
    records = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert n == len(records) > 0
    for r in records:
        assert validate(r) is None and r["messages"][-1]["role"] == "assistant"


def test_cli_dry_run_and_config_file(tiny_dir, rows_path, tmp_path, capsys):
    import kdcache_cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"teacher: {tiny_dir}\ndataset: {rows_path}\nk: 16\nmax_length: 128\n")
    assert kdcache_cli.main(["cache", "--config", str(cfg), "--dry-run", "--max-length", "256"]) == 0
    out = capsys.readouterr().out
    assert "dry run over 24 inputs" in out and "B/position at k=16" in out and "estimated teacher time" in out
    assert kdcache_cli.main(["cache", "--config", str(cfg)]) == 1  # no --out: a one-line InputError
    assert "no output folder" in capsys.readouterr().err
