"""A run never quietly does less than it was asked (issue 20, items 4 and 8-11): pure bf16 that would not
train is refused, warmup longer than the run and an empty held-out split are said, examples longer than
--max-tokens are counted and never make an empty step, an empty cache stops with one line."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from formats import CacheReader, CacheWriter, CodecConfig
from formats.errors import InputError
from train_student.config import make_config
from train_student.data import ExampleStream, Packer
from train_student.train import run

from .kd_fixtures import K, final_weights


def config(tiny, out, **kw):
    values = dict(
        student=str(tiny["student"]),
        cache=[str(tiny["cache"])],
        out=str(out),
        steps=2,
        max_tokens=64,
        eval_every=0,
        save_every=0,
        log_every=1,
        tensorboard=False,
        progress=False,
        lr=1e-5,
        warmup_steps=0,
    )
    values.update(kw)
    return make_config(**values)


def student_weights(tiny) -> dict:
    from safetensors.torch import load_file

    return load_file(str(next(tiny["student"].glob("*.safetensors"))))


@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
def test_weights_move_in_every_dtype_mode_at_the_papers_learning_rate(tiny, tmp_path, dtype):
    assert run(config(tiny, tmp_path / "run", dtype=dtype)) == 0  # lr 1e-5: configs/paper/train_base.yaml
    before, after = student_weights(tiny), final_weights(tmp_path / "run")
    matrices = [k for k, v in before.items() if v.dim() >= 2 and k in after]
    moved = np.mean([(after[k].float() != before[k].float()).float().mean().item() for k in matrices])
    assert moved > 0.9, f"only {moved:.1%} of the matrix weights changed under {dtype}"


def test_pure_bf16_that_would_not_train_is_refused_naming_bf16_mixed(tiny, tmp_path):
    with pytest.raises(InputError, match="bf16-mixed"):
        run(config(tiny, tmp_path / "run", dtype="bfloat16"))
    assert not (tmp_path / "run" / "final").exists()
    from train_student.train import check_bf16_updates

    big = torch.nn.Linear(64, 64).weight.to(torch.bfloat16)
    check_bf16_updates([big], lr=1e-1)  # a large enough step moves bf16 weights: allowed
    with pytest.raises(InputError, match="would not train"):
        check_bf16_updates([big], lr=1e-6)


def test_warmup_longer_than_the_run_is_said(tiny, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="train_student"):
        assert run(config(tiny, tmp_path / "run", warmup_steps=100, steps=3)) == 0
    assert "never reaches --lr" in caplog.text


def test_an_empty_held_out_split_is_said_and_recorded(tiny, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="train_student"):
        assert run(config(tiny, tmp_path / "run", eval_fraction=1e-9, eval_every=1)) == 0
    assert "held-out split is empty" in caplog.text
    record = json.loads((tmp_path / "run" / "held_out.json").read_text())
    assert record["stage0"]["examples"] == 0


@pytest.mark.parametrize("policy", ["truncate", "skip"])
def test_examples_longer_than_max_tokens_are_counted_and_no_step_trains_nothing(tiny, policy):
    reader = CacheReader(tiny["cache"])
    examples = list(reader)
    max_tokens = 16  # rows are 12-40 tokens, trained from the middle: many train nothing in their first 16
    batches = list(
        Packer(ExampleStream([CacheReader(tiny["cache"])]), max_tokens=max_tokens, k=K, long_examples=policy)
    )
    assert all(b.n_targets > 0 for b in batches)
    long = [ex for ex in examples if len(ex.input_ids) > max_tokens]
    nothing = [ex for ex in long if ex.target_positions[0] >= max_tokens]
    skipped, truncated = sum(b.skipped for b in batches), sum(b.truncated for b in batches)
    if policy == "skip":
        assert skipped == len(long) and truncated == 0
    else:
        assert skipped == len(nothing) and truncated == len(long) - len(nothing)
        assert sum(b.dropped for b in batches) == sum(
            int((ex.target_positions >= max_tokens).sum()) for ex in long if ex not in nothing
        )
    assert sum(b.n_examples for b in batches) + skipped == len(examples)


def test_the_log_counts_what_max_tokens_cut(tiny, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="train_student"):
        assert run(config(tiny, tmp_path / "run", max_tokens=16, steps=None, epochs=1)) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all(r["tokens"] > 0 for r in train) and sum(r["skipped_examples"] for r in train) > 0
    assert sum(r["truncated_examples"] for r in train) > 0 and "raise --max-tokens" in caplog.text


def test_training_on_an_empty_cache_stops_with_one_line(tiny, tmp_path):
    prov = json.loads((tiny["cache"] / "manifest.json").read_text())
    with CacheWriter(
        tmp_path / "empty",
        codec=CodecConfig(k=K, hot=64),
        provenance={"tokenizer": prov["tokenizer"], "teacher": prov["teacher"]},
    ):
        pass
    with pytest.raises(InputError, match="no examples|no optimizer step"):
        run(config(tiny, tmp_path / "run", cache=[str(tmp_path / "empty")]))
    assert not (tmp_path / "run" / "final").exists()
