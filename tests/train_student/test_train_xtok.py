"""`kdcache train` with a student whose tokenizer differs from the cache's teacher (issue 12): a cache
of a tiny byte-level BPE teacher (ChatML) with its tokenizer files and conversations, students with a
SentencePiece-style Unigram tokenizer (Gemma style, with or without a chat template) or the teacher's
own tokenizer. Each test trains a 2-layer model for a few steps in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from formats.errors import InputError
from train_student.__main__ import main as train_main

from .kd_fixtures import final_weights, make_model, read_metrics, save_model, train_args
from .xtok_fixtures import GEMMA_STYLE, byte_level_bpe, unigram

WORDS = (
    "the cat dog sat ran on a mat in house big small red blue green quick brown fox jumps over lazy "
    "what is two plus four six equals answer hello world yes no maybe today fine thank you"
).split()


def _conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Short deterministic chats: a question and a reply of a few words each."""
    rng = np.random.default_rng(seed)
    say = lambda lo, hi: " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))  # noqa: E731
    return [
        [
            {"role": "user", "content": say(3, 7).capitalize() + "?"},
            {"role": "assistant", "content": say(6, 14).capitalize() + "."},
        ]
        for _ in range(n)
    ]


def _model(tokenizer, seed: int, scale: float = 0.0):
    model = make_model(seed=seed, vocab=len(tokenizer), scale=scale)
    # the model's BOS/EOS are its tokenizer's (check_student_rendering compares them)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = None
    return model


def _write_cache(teacher, tokenizer, out, conversations, *, tokenizer_files: bool = True, k: int = 8):
    """What `kdcache cache` writes in score mode: the teacher's rendering, its top-k at the assistant
    tokens, the conversation in meta["messages"], the tokenizer files (unless `tokenizer_files` is off:
    a cache written before they were stored)."""
    from formats import CacheWriter, CodecConfig, Example
    from formats.template import ChatTemplater
    from formats.tokenizer_files import save_tokenizer_files
    from formats.tokenizer_id import tokenizer_info

    templater = ChatTemplater(tokenizer)
    provenance = {
        "tokenizer": tokenizer_info(tokenizer, "tiny-bpe"),
        "teacher": {"name_or_path": "tiny-teacher"},
        "template": {"messages_in_meta": True, "end_of_turn_ids": sorted(templater.eot_ids)},
    }
    with CacheWriter(out, codec=CodecConfig(k=k, hot=64), provenance=provenance, row_group_positions=200) as w:
        for i, messages in enumerate(conversations):
            t = templater.score({"id": f"ex{i:04d}", "messages": messages})
            ids = t.input_ids
            with torch.no_grad():
                logp = torch.log_softmax(teacher(torch.from_numpy(ids).long()[None]).logits[0].double(), -1)
            rows = logp[t.target_positions - 1]
            top = torch.topk(rows, k, dim=-1)
            target = rows.gather(1, torch.from_numpy(ids[t.target_positions]).long()[:, None])[:, 0]
            w.write(
                Example(
                    id=t.id,
                    input_ids=ids,
                    target_positions=t.target_positions,
                    topk_ids=top.indices.numpy().astype(np.int32),
                    topk_logprobs=top.values.numpy().astype(np.float32),
                    target_logprobs=target.numpy().astype(np.float32),
                    target_ranks=((rows > target[:, None]).sum(1) + 1).numpy().astype(np.int32),
                    meta={"messages": messages},
                )
            )
        if tokenizer_files:
            w.manifest["tokenizer_files"] = save_tokenizer_files(tokenizer, out)
    return out


@pytest.fixture(scope="module")
def xt(tmp_path_factory):
    """Paths: cache (the BPE teacher's), old_cache (the same without tokenizer files), gemma (a Unigram
    student with a Gemma-style template), base (the same student without a template: a base model),
    same (a student with the teacher's tokenizer)."""
    root = tmp_path_factory.mktemp("xtok-train")
    chats = _conversations(40)
    texts = [m["content"] for c in chats for m in c] * 3
    teacher_tok = byte_level_bpe(texts=texts, vocab_size=300)
    student_tok = unigram(texts=texts, vocab_size=120)
    teacher = _model(teacher_tok, seed=1, scale=0.12).eval()
    base = save_model(_model(student_tok, seed=2), student_tok, root / "base")
    student_tok.chat_template = GEMMA_STYLE
    return {
        "cache": _write_cache(teacher, teacher_tok, root / "cache", chats),
        "old_cache": _write_cache(teacher, teacher_tok, root / "old-cache", chats, tokenizer_files=False),
        "gemma": save_model(_model(student_tok, seed=2), student_tok, root / "gemma"),
        "base": base,
        "same": save_model(_model(teacher_tok, seed=2), teacher_tok, root / "same"),
    }


def _args(student, cache, out, **flags):
    return train_args(student, cache, out, **{"max_tokens": 128, "warmup_steps": 1, **flags})


def _run(student, cache, out, **flags):
    """Train in-process through `train.run` (errors raise, as the CLI would report them)."""
    from train_student.config import make_config
    from train_student.train import run

    return run(
        make_config(
            student=str(student),
            cache=[str(cache)],
            out=str(out),
            dtype="float32",
            progress=False,
            tensorboard=False,
            **flags,
        )
    )


@pytest.mark.slow
def test_student_with_another_tokenizer_trains(xt, tmp_path):
    """(a) auto: the tokenizers differ -> hybrid; the loss falls, aligned_fraction in (0, 1] in the train
    and eval metrics, and the run records the method, the template and the vocabulary map."""
    out = tmp_path / "run"
    assert (
        train_main(
            _args(xt["gemma"], xt["cache"], out, steps=12, lr=1e-2, epochs=0, ce_weight=0.5, cross_tokenizer="auto")
        )
        == 0
    )
    rows = read_metrics(out)
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 12 and all(np.isfinite(r["loss"]) for r in train)
    assert np.mean([r["loss"] for r in train[-3:]]) < 0.9 * np.mean([r["loss"] for r in train[:3]]), train
    for r in train + [r for r in rows if r["split"] == "eval"]:
        assert 0 < r["aligned_fraction"] <= 1, r
        assert r["exact_share"] + r["uld_share"] == pytest.approx(r["aligned_fraction"])
        assert r["no_teacher_share"] == pytest.approx(1 - r["aligned_fraction"])
    assert any(r["exact_share"] > 0 for r in train) and any(r["uld_share"] > 0 for r in train)
    record = json.loads((out / "cross_tokenizer.json").read_text())["stage0"]
    assert record["method"] == "hybrid" and record["student_template"]["source"] == "tokenizer"
    assert record["student_template"]["bos"] == "rendered"  # GEMMA_STYLE renders {{ bos_token }}
    assert 0 < record["vocab_map"]["coverage"] < 1
    assert (out / "vocab_maps").is_dir() and list((out / "vocab_maps").glob("vocab_map-*.npy"))


def test_off_with_another_tokenizer_names_the_option(xt, tmp_path):
    """(b) --cross-tokenizer off with a different tokenizer: refused before training, naming the option."""
    out = tmp_path / "run"
    with pytest.raises(InputError, match="--cross-tokenizer"):
        _run(xt["gemma"], xt["cache"], out, steps=2, cross_tokenizer="off")
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_identical_tokenizers_hybrid_equals_off(xt, tmp_path):
    """(c) the old path checks the new one: with the teacher's own tokenizer, --cross-tokenizer hybrid
    (alignment, vocabulary map, xtok_loss) gives the first-step loss and the weights after 2 steps of
    --cross-tokenizer off (kd_loss on the cached rows)."""
    runs = {}
    for mode in ("off", "hybrid"):
        out = tmp_path / mode
        assert train_main(_args(xt["same"], xt["cache"], out, steps=2, ce_weight=0.5, cross_tokenizer=mode)) == 0
        runs[mode] = out
    first = {m: [r for r in read_metrics(o) if r["split"] == "train"][0] for m, o in runs.items()}
    assert first["hybrid"]["loss"] == pytest.approx(first["off"]["loss"], rel=1e-6, abs=1e-7)
    assert first["hybrid"]["aligned_fraction"] == 1.0 and first["hybrid"]["exact_share"] == 1.0
    assert "aligned_fraction" not in first["off"]  # the ordinary path's rows are unchanged
    a, b = final_weights(runs["off"]), final_weights(runs["hybrid"])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{key} differs")


def test_base_student_needs_a_template(xt, tmp_path):
    """(d) a base-model student (no chat template) without --student-template: refused before training,
    naming the option."""
    out = tmp_path / "run"
    with pytest.raises(InputError, match="--student-template"):
        _run(xt["base"], xt["cache"], out, steps=2)
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_base_student_trains_with_builtin_template(xt, tmp_path):
    """(d) with --student-template tulu3 it trains; the student's <bos> (not rendered by Tulu 3, named by
    the model config) is prepended and recorded."""
    out = tmp_path / "run"
    assert train_main(_args(xt["base"], xt["cache"], out, steps=2, student_template="tulu3")) == 0
    record = json.loads((out / "cross_tokenizer.json").read_text())["stage0"]["student_template"]
    assert record["source"] == "builtin:tulu3" and record["bos"] == "prepended"
    assert all(0 < r["aligned_fraction"] <= 1 for r in read_metrics(out) if r["split"] == "train")


def test_old_cache_gives_the_add_tokenizer_command(xt, tmp_path):
    """(e) a cache written before caches carried the teacher's tokenizer: the add-tokenizer command."""
    with pytest.raises(InputError, match=r"kdcache add-tokenizer .*old-cache --tokenizer tiny-bpe"):
        _run(xt["gemma"], xt["old_cache"], tmp_path / "run", steps=2)


def test_same_tokenizer_old_cache_still_trains_off(xt, tmp_path):
    """An old cache (no tokenizer files) keeps working for a student with the teacher's tokenizer (auto -> off)."""
    out = tmp_path / "run"
    assert train_main(_args(xt["same"], xt["old_cache"], out, steps=1)) == 0
    assert not (out / "cross_tokenizer.json").exists()


def test_aligned_stream_resumes_exactly(xt):
    """AlignedStream reads ahead in a thread; its cursor is the one after the last example handed out,
    so a stream loaded from it continues with the next example (none skipped or repeated)."""
    from transformers import AutoTokenizer

    from formats import CacheReader
    from formats.tokenizer_files import load_cache_tokenizer
    from train_student.xtok.align import Aligner
    from train_student.data import AlignedStream, ExampleStream
    from train_student.xtok.template import resolve_student_template
    from train_student.xtok.vocab_map import build_vocab_map

    teacher = load_cache_tokenizer(xt["cache"])
    student = AutoTokenizer.from_pretrained(xt["gemma"])
    aligner = Aligner(teacher, student, resolve_student_template(None, student))
    vmap = build_vocab_map(teacher, student)

    def stream():
        return AlignedStream(
            ExampleStream([CacheReader(xt["cache"], shuffle=True, seed=3)]), aligner, vmap, "hybrid", ahead=8
        )

    whole = [ex.id for ex in stream()]
    first = stream()
    head = [next(first).id for _ in range(5)]
    state = first.state_dict()
    first.close()
    second = stream()
    second.load_state_dict(state)
    assert head + [ex.id for ex in second] == whole and len(whole) == 40


def test_damaged_vocab_map_in_the_run_folder_is_named(xt, tmp_path):
    """A broken cached vocabulary map (OUT/vocab_maps/) stops the run before training, naming the file."""
    from transformers import AutoTokenizer

    from formats.errors import FormatError
    from formats.tokenizer_files import load_cache_tokenizer
    from formats.tokenizer_id import tokenizer_fingerprint
    from train_student.xtok.vocab_map import vocab_map_path

    out = tmp_path / "run"
    path = vocab_map_path(
        out / "vocab_maps",
        tokenizer_fingerprint(load_cache_tokenizer(xt["cache"])),
        tokenizer_fingerprint(AutoTokenizer.from_pretrained(xt["gemma"])),
    )
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a numpy file")
    with pytest.raises(FormatError, match=f"{path.name}.*delete it"):
        _run(xt["gemma"], xt["cache"], out, steps=1)
    assert not (out / "metrics.jsonl").exists()
