"""cache_teacher.export_sft: a generate-mode cache back out as chat records (`kdcache export-sft`):
which responses are written (stop, length with keep_length, empty ones never), how each record is
built (the prompt turns, the decoded response), and the one-line refusals (a score-mode cache, no
tokenizer, another tokenizer, an example without its messages). The caches are written here with a
tiny tokenizer; tests/cache_teacher/test_run.py exports one that a real run generated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cache_teacher.export_sft import export_sft, iter_cache
from cache_teacher.data import validate
from formats import CacheWriter, CodecConfig, Example
from formats.errors import InputError
from formats.tokenizer_id import tokenizer_info

from ..tokenizer_helpers import tiny_tokenizer

PROMPT = [{"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    tiny_tokenizer().save_pretrained(path)
    return path


def sample(tok, sid, reply, finish="stop", *, messages=PROMPT, prompt_turns=True, with_messages=True):
    """One generated sample as run.py writes it: prompt tokens, then the reply's (and <|im_end|> if it stopped)."""
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tok(reply, add_special_tokens=False)["input_ids"] if reply else []
    reply_ids += [tok.convert_tokens_to_ids("<|im_end|>")] if finish == "stop" else []
    ids = np.asarray(prompt_ids + reply_ids, np.int32)
    positions = np.arange(len(prompt_ids), len(ids), dtype=np.int32)
    n, k = len(positions), 4
    top = np.stack([np.roll(np.arange(3, 3 + k), j) for j in range(n)]).astype(np.int32)
    top[:, 0] = ids[positions]  # the teacher's top-1 is the token it generated
    logp = np.log(np.full((n, k), 0.2, np.float32))
    meta = {"sample": 0, "prompt_tokens": len(prompt_ids)}
    if with_messages:
        meta["messages"] = [*messages, {"role": "assistant", "content": reply}]
        if prompt_turns:
            meta["prompt_turns"] = len(messages)
        else:  # a cache from before prompt_turns: meta["messages"] is the prompt alone
            meta["messages"] = list(messages)
    return Example(
        sid,
        ids,
        positions,
        top,
        logp,
        logp[:, 0].copy(),
        np.ones(n, np.int32),
        source="unit-src",
        finish_reason=finish,
        meta=meta,
    )


def write_cache(path, tok, examples, *, mode="generate", tokenizer_entry=None) -> Path:
    provenance = {
        "teacher": {"name_or_path": "unit-teacher"},
        "tokenizer": tokenizer_entry if tokenizer_entry is not None else tokenizer_info(tok, "unused"),
        "mode": mode,
    }
    with CacheWriter(path, codec=CodecConfig(k=4), provenance=provenance) as w:
        for ex in examples:
            w.write(ex)
    return path


def records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def cache(tok, tok_dir, tmp_path_factory) -> Path:
    """Samples: stopped, cut at max_new_tokens, stopped with an empty reply, and an older cache's (no prompt_turns)."""
    examples = [
        sample(tok, "a#s0", "Two plus two is four."),
        sample(tok, "a#s1", "Two plus two is", finish="length"),
        sample(tok, "b#s0", ""),
        sample(tok, "c#s0", "Hello, how are you?", prompt_turns=False),
    ]
    return write_cache(
        tmp_path_factory.mktemp("gen") / "cache", tok, examples, tokenizer_entry=tokenizer_info(tok, str(tok_dir))
    )


def test_iter_cache_yields_every_example_in_order(cache):
    assert [ex.id for ex in iter_cache(cache)] == ["a#s0", "a#s1", "b#s0", "c#s0"]


def test_stopped_responses_become_chat_records(cache, tmp_path):
    n = export_sft(cache, tmp_path / "sft.jsonl")
    got = records(tmp_path / "sft.jsonl")
    assert n == len(got) == 2  # the cut-off sample and the empty reply are left out
    assert got[0] == {
        "id": "a#s0",
        "messages": PROMPT + [{"role": "assistant", "content": "Two plus two is four."}],  # <|im_end|> dropped
        "source": "unit-src",
        "finish_reason": "stop",
    }
    assert got[1]["id"] == "c#s0" and got[1]["messages"][-1]["content"] == "Hello, how are you?"
    assert all(validate(r) is None for r in got)  # the input format of `kdcache cache` and the trainer


def test_keep_length_also_writes_responses_cut_at_max_new_tokens(cache, tmp_path):
    n = export_sft(cache, tmp_path / "sft.jsonl", keep_length=True)
    got = {r["id"]: r for r in records(tmp_path / "sft.jsonl")}
    assert n == 3 and sorted(got) == ["a#s0", "a#s1", "c#s0"]
    assert got["a#s1"]["finish_reason"] == "length"
    assert got["a#s1"]["messages"] == PROMPT + [{"role": "assistant", "content": "Two plus two is"}]


def test_the_prompt_turns_are_kept_and_the_cached_reply_replaced_by_the_decoded_one(tok, tok_dir, tmp_path):
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "What is two plus two?"},
    ]
    ex = sample(tok, "m#s0", "Two plus two is four.", messages=convo)
    ex.meta["messages"][-1]["content"] = "a reply the decoded tokens override"
    cache = write_cache(tmp_path / "c", tok, [ex], tokenizer_entry=tokenizer_info(tok, str(tok_dir)))
    export_sft(cache, tmp_path / "sft.jsonl")
    (record,) = records(tmp_path / "sft.jsonl")
    assert record["messages"] == convo + [{"role": "assistant", "content": "Two plus two is four."}]


def test_out_folders_are_made_and_no_temporary_file_is_left(cache, tmp_path):
    out = tmp_path / "new" / "deeper" / "sft.jsonl"
    assert export_sft(cache, out) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["sft.jsonl"]


def test_an_explicit_tokenizer_replaces_a_recorded_path_that_is_gone(tok, tok_dir, tmp_path):
    entry = tokenizer_info(tok, str(tmp_path / "moved-away"))
    cache = write_cache(tmp_path / "c", tok, [sample(tok, "a#s0", "Two plus two is four.")], tokenizer_entry=entry)
    with pytest.raises(InputError, match="cannot load the tokenizer of .*moved-away"):
        export_sft(cache, tmp_path / "sft.jsonl")
    assert export_sft(cache, tmp_path / "sft.jsonl", tokenizer=str(tok_dir)) == 1


def test_a_score_mode_cache_is_refused_naming_the_mode_and_the_fix(tok, tok_dir, tmp_path):
    cache = write_cache(
        tmp_path / "c", tok, [sample(tok, "a", "Four.")], mode="score", tokenizer_entry=tokenizer_info(tok, tok_dir)
    )
    with pytest.raises(InputError) as err:
        export_sft(cache, tmp_path / "sft.jsonl")
    assert str(err.value) == (
        f"{cache} is a 'score'-mode cache; export-sft needs a generate-mode cache (kdcache cache --mode generate)"
    )
    assert not (tmp_path / "sft.jsonl").exists()


def test_a_cache_that_records_no_tokenizer_asks_for_one(tok, tmp_path):
    cache = write_cache(tmp_path / "c", tok, [sample(tok, "a#s0", "Four.")], tokenizer_entry={"vocab_size": 300})
    with pytest.raises(InputError) as err:
        export_sft(cache, tmp_path / "sft.jsonl")
    assert str(err.value) == f"{cache}: the manifest records no tokenizer; pass --tokenizer"


def test_another_tokenizer_is_refused_by_fingerprint(cache, tmp_path):
    other = tmp_path / "other-tokenizer"
    tiny_tokenizer(extra_specials=("<|other|>",)).save_pretrained(other)
    with pytest.raises(InputError) as err:
        export_sft(cache, tmp_path / "sft.jsonl", tokenizer=str(other))
    assert str(err.value) == f"tokenizer {other} is not the one {cache} was made with (fingerprints differ)"


def test_an_example_without_its_prompt_messages_is_an_error_naming_it(tok, tok_dir, tmp_path):
    examples = [sample(tok, "a#s0", "Four."), sample(tok, "bare#s0", "Four.", with_messages=False)]
    cache = write_cache(tmp_path / "c", tok, examples, tokenizer_entry=tokenizer_info(tok, str(tok_dir)))
    (tmp_path / "sft.jsonl").write_text("an earlier export\n")
    with pytest.raises(InputError) as err:
        export_sft(cache, tmp_path / "sft.jsonl")
    assert str(err.value) == f"{cache}: example 'bare#s0' has no prompt messages in its meta"
    assert (tmp_path / "sft.jsonl").read_text() == "an earlier export\n"  # the old export is untouched


def test_a_failed_export_leaves_no_temporary_file(tok, tok_dir, tmp_path):
    examples = [sample(tok, "a#s0", "Four."), sample(tok, "bare#s0", "Four.", with_messages=False)]
    cache = write_cache(tmp_path / "c", tok, examples, tokenizer_entry=tokenizer_info(tok, str(tok_dir)))
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError):
        export_sft(cache, tmp_path / "out" / "sft.jsonl")
    assert list((tmp_path / "out").iterdir()) == []


def test_an_output_that_is_a_link_is_replaced_not_written_through(cache, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not kdcache's\n")
    (tmp_path / "sft.jsonl").symlink_to(outside)
    assert export_sft(cache, tmp_path / "sft.jsonl") >= 1
    assert outside.read_text() == "not kdcache's\n"  # the link's target is untouched
    assert not (tmp_path / "sft.jsonl").is_symlink()
