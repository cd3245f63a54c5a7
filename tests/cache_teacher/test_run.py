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
from cache_teacher.dry_run import dry_run
from cache_teacher.run import run_cache
from formats.manifest import load_manifest
from formats.tools import verify_cache

from .teacher_helpers import REPO, make_config, write_jsonl


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
    config = make_config(
        teacher=str(tiny_dir), dataset=str(path), out=str(tmp_path / "cache"), length_policy="drop", max_length=512
    )
    summary = run_cache(config, engine=tiny_engine)
    manifest = load_manifest(tmp_path / "cache")
    got = rejects(tmp_path / "cache")
    assert got == {
        "no-messages": "missing_messages",
        "no-assistant": "no_assistant_turn",
        "empty": "empty_assistant_content",
        "int-content": "non_string_content",
        "bad-role": "unknown_role",
        "overlong": "too_long",
    }
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
import kdcache.cli as kdcache_cli
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


@pytest.mark.multiprocess
def test_sigkill_then_rerun_equals_uninterrupted(tiny_dir, tiny_engine, sample_rows, tmp_path):
    rows = sample_rows[:40] + [{"id": "bad"}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    common = [
        "--teacher",
        str(tiny_dir),
        "--engine",
        "hf",
        "--dtype",
        "float32",
        "--dataset",
        str(path),
        "--k",
        "8",
        "--max-length",
        "256",
        "--batch-size",
        "4",
        "--row-group-positions",
        "100",
        "--shard-max-bytes",
        "1",
        "--no-progress",
    ]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "kdcache.cli", "cache", *common, "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    # The same command, SIGKILLed by itself right after its third shard is published: a crash at a
    # known point, not at whatever point a polling loop happens to notice.
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_SHARDS, "3", "cache", *common, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
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


@pytest.mark.slow
def test_two_workers_and_merge_equal_one_worker(tiny_dir, tiny_engine, rows_path, tmp_path):
    from cache_teacher.launch import merge

    one = make_config(teacher=str(tiny_dir), dataset=str(rows_path), out=str(tmp_path / "one"))
    run_cache(one, engine=tiny_engine)
    parts = []
    for i in range(2):
        c = make_config(
            teacher=str(tiny_dir), dataset=str(rows_path), out=str(tmp_path / f"w{i}"), num_workers=2, worker_index=i
        )
        s = run_cache(c, engine=tiny_engine)
        assert s.examples > 0
        parts.append(tmp_path / f"w{i}")
    merge(tmp_path / "merged", parts)
    assert_same_cache(tmp_path / "one", tmp_path / "merged", atol=1e-6)
    # the workers' input counts add up, so verify checks the merged cache's accounting too
    assert load_manifest(tmp_path / "merged")["counts"]["inputs"] == load_manifest(tmp_path / "one")["counts"]["inputs"]
    verify_cache(tmp_path / "merged")


@pytest.mark.slow
def test_generate_mode_and_export(tiny_dir, tiny_engine, rows_path, tmp_path):
    config = make_config(
        teacher=str(tiny_dir),
        dataset=str(rows_path),
        out=str(tmp_path / "gen"),
        mode="generate",
        n=2,
        max_examples=3,
        temperature=0.8,
        max_new_tokens=16,
    )
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
    for ex in examples.values():  # the conversation as rendered: the prompt, then the reply as the assistant turn
        turns, messages = ex.meta["prompt_turns"], ex.meta["messages"]
        assert len(messages) == turns + 1 and messages[-1]["role"] == "assistant"
        assert messages[-1]["content"] == tokenizer_of(tmp_path / "gen").decode(
            ex.input_ids[ex.target_positions].tolist(), skip_special_tokens=True
        )
    n = export_sft(tmp_path / "gen", tmp_path / "sft.jsonl", keep_length=True)
    records = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert n == len(records) > 0
    for r in records:
        assert validate(r) is None and r["messages"][-1]["role"] == "assistant"


def tokenizer_of(cache):
    from formats.tokenizer_files import load_cache_tokenizer

    return load_cache_tokenizer(cache)


def test_the_cache_carries_the_tokenizer_and_the_conversations(tiny_dir, tiny_engine, sample_rows, tmp_path):
    rows = sample_rows[:6]
    config = make_config(
        teacher=str(tiny_dir), dataset=str(write_jsonl(tmp_path / "rows.jsonl", rows)), out=str(tmp_path / "c")
    )
    run_cache(config, engine=tiny_engine)
    manifest = load_manifest(tmp_path / "c")
    assert {e["file"] for e in manifest["tokenizer_files"]} == {
        p.name for p in (tmp_path / "c" / "tokenizer").iterdir()
    }
    assert verify_cache(tmp_path / "c")["tokenizer_files"] == len(manifest["tokenizer_files"])
    from transformers import AutoTokenizer

    assert tokenizer_of(tmp_path / "c").get_vocab() == AutoTokenizer.from_pretrained(tiny_dir).get_vocab()
    assert manifest["extra"]["template"]["messages_in_meta"] is True
    by_id = {r["id"]: [{"role": m["role"], "content": m["content"]} for m in r["messages"]] for r in rows}
    examples = read(tmp_path / "c")
    assert examples and all(ex.meta["messages"] == by_id[key] for key, ex in examples.items())


# ---- resume compares every setting that changes the rows; generate-mode accounting (issue 9) ----


class _TeacherDies(RuntimeError):
    pass


class _DyingEngine:
    """Killed on its first batch: leaves an unfinished cache behind."""

    def score(self, *args, **kwargs):
        raise _TeacherDies

    generate = score


class _NoEngine:
    """Any use fails the test: the settings must be compared before the teacher runs."""

    def __getattr__(self, name):
        raise AssertionError(f"engine.{name} used before the resume settings were compared")


TINY = object()  # stands for the tiny_dir fixture's path
# setting -> (another value, the key the refusal must name). The base run is generate mode.
CHANGES = {
    "temperature": (1.0, "sampling.temperature"),
    "top_p": (1.0, "sampling.top_p"),
    "n": (3, "sampling.n"),
    "max_new_tokens": (8, "sampling.max_new_tokens"),
    "seed": (1, "sampling.seed"),
    "max_length": (128, "template.max_length"),
    "length_policy": ("drop", "template.length_policy"),
    "k": (4, "codec.k"),
    "mass": (0.9, "codec.mass"),
    "mode": ("score", "mode"),
    "teacher": (TINY, "teacher.name_or_path"),
    "tokenizer": (TINY, "tokenizer.name_or_path"),
    "revision": ("v2", "teacher.revision"),
    "engine": ("vllm", "teacher.engine"),
    "dtype": ("bfloat16", "teacher.dtype"),
    "dataset": ("OTHER", "dataset.name"),
    "split": ("test", "dataset.split"),
    "sources": (["x"], "dataset.filters.sources"),
    "fraction": (0.5, "dataset.filters.fraction"),
    "max_examples": (2, "dataset.filters.max_examples"),
    "worker_index": (1, "dataset.filters.worker_index"),
}
# Settings that do not change the rows (or, where noted, are recorded only where they do).
NOT_ROWS = {
    "dataset_revision",  # hub datasets only, recorded as dataset.revision (local files are hashed instead)
    "dataset_config",  # hub datasets only, recorded as dataset.config (null for local files)
    "license",  # recorded as the manifest's license, not a row setting
    "streaming",
    "tensor_parallel_size",  # vLLM only: recorded as teacher.tensor_parallel_size
    "num_workers",  # tested with worker_index (worker_index must stay below it)
    "gpu_memory_utilization",
    "max_num_batched_tokens",
    "max_model_len",
    "enforce_eager",
    "kv_cache_space_gb",
    "batch_size",
    "hf_batch_tokens",
    "out",
    "staging",  # where a remote --out is staged locally
    "shard_max_bytes",
    "row_group_positions",
    "resume",
    "dry_run",
    "dry_run_tokens_per_s",
    "progress",
    "launcher",
    "ray_address",
    "gpus_per_worker",
    "cpus_per_worker",
    "command",
    "verbose",  # how much a failing engine start prints
    "engine_reason",
    "dtype_reason",  # why auto chose the engine and dtype (recorded in extra.config; the choice itself is teacher.engine and teacher.dtype)
}


def test_every_setting_is_classified():
    from cache_teacher.config import FIELDS

    assert set(CHANGES) | NOT_ROWS == FIELDS, "a new setting: add it to CHANGES (it changes the rows) or NOT_ROWS"


@pytest.mark.parametrize("finished", [False, True], ids=["unfinished", "finished"])
@pytest.mark.parametrize("setting", sorted(CHANGES))
def test_resume_with_another_setting_is_refused(
    setting, finished, smollm2_dir, tiny_dir, tokenizer, rows_path, tmp_path
):
    from formats.errors import InputError

    base = dict(
        teacher=str(smollm2_dir),
        dataset=str(rows_path),
        out=str(tmp_path / "c"),
        mode="generate",
        n=2,
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=16,
        seed=0,
        max_examples=0 if finished else 3,
        num_workers=2,
    )
    if finished:
        run_cache(make_config(**base), engine=_NoEngine(), tokenizer=tokenizer)  # no inputs: finished at once
        assert (tmp_path / "c" / "manifest.json").exists()
    else:
        with pytest.raises(_TeacherDies):
            run_cache(make_config(**base), engine=_DyingEngine(), tokenizer=tokenizer)
        assert (tmp_path / "c" / "_progress" / "job.json").exists()
    value, key = CHANGES[setting]
    value = (
        {TINY: str(tiny_dir), "OTHER": str(write_jsonl(tmp_path / "other.jsonl", [{"id": "x"}]))}.get(value, value)
        if not isinstance(value, list)
        else value
    )
    with pytest.raises(InputError) as info:
        run_cache(make_config(**{**base, setting: value}), engine=_NoEngine(), tokenizer=tokenizer)
    message = str(info.value)
    assert f"{key}: " in message and "new folder" in message, message


def test_generate_mode_accounts_for_every_sample(tiny_dir, tiny_engine, sample_rows, tmp_path):
    rows = [sample_rows[0], {"id": "no-messages"}, {**sample_rows[1], "id": "overlong"}]
    rows[2]["messages"] = [{"role": "user", "content": "word " * 400}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    config = make_config(
        teacher=str(tiny_dir),
        dataset=str(path),
        out=str(tmp_path / "gen"),
        mode="generate",
        n=2,
        max_new_tokens=8,
        max_length=128,
    )
    summary = run_cache(config, engine=tiny_engine)
    counts = load_manifest(tmp_path / "gen")["counts"]
    assert (counts["examples"], counts["rejects"], counts["inputs"]) == (2, 4, 3 * 2)
    assert sorted(rejects(tmp_path / "gen")) == ["no-messages#s0", "no-messages#s1", "overlong#s0", "overlong#s1"]
    assert summary.examples + sum(summary.rejects.values()) == 6 and "x n=2" in summary.report()
    verify_cache(tmp_path / "gen")
    dry = dry_run(config)
    assert (dry.examples, sum(dry.rejects.values())) == (2, 4)


def test_a_merged_cache_with_other_settings_is_refused_before_the_workers_start(
    smollm2_dir, tokenizer, rows_path, tmp_path
):
    from cache_teacher.launch import worker_configs
    from cache_teacher.provenance import check_finished_cache
    from formats.errors import InputError

    base = dict(
        teacher=str(smollm2_dir),
        dataset=str(rows_path),
        out=str(tmp_path / "merged"),
        max_examples=0,
        num_workers=2,
        launcher="ray",
    )
    worker0 = worker_configs(make_config(**base))[0]
    run_cache(make_config(**{**worker0.to_dict(), "out": base["out"]}), engine=_NoEngine(), tokenizer=tokenizer)
    check_finished_cache(base["out"], worker0, tokenizer)  # the same settings: a rerun of a finished job
    with pytest.raises(InputError, match="codec.k: 8 -> 16"):
        check_finished_cache(base["out"], worker_configs(make_config(**{**base, "k": 16}))[0], tokenizer)
    pytest.importorskip("ray")
    from cache_teacher.launch import launch_ray

    with pytest.raises(InputError, match="codec.k: 8 -> 16"):  # before any worker starts
        launch_ray(make_config(**{**base, "k": 16}))


def test_engine_info_records_the_teachers_output_size(tmp_path):
    """issue 9, item 10: the manifest's teacher.output_size is the teacher's LM-head rows."""
    from transformers import LlamaConfig

    from cache_teacher.provenance import engine_info

    LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1
    ).save_pretrained(tmp_path / "teacher")
    assert engine_info(make_config(teacher=str(tmp_path / "teacher"), out=str(tmp_path / "out")))["output_size"] == 1024
