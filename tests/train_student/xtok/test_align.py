"""Cross-tokenizer alignment (train_student/xtok/align.py) on tokenizers built offline: hand-checked spans,
multi-byte characters, special tokens, self-alignment, hostile inputs; one slow test on the real
SmolLM2 -> Gemma 3 pair."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from formats.template import ChatTemplater
from formats.errors import InputError
from train_student.xtok.align import Aligner, student_targets
from train_student.xtok.template import StudentTemplate
from train_student.xtok.vocab_map import build_vocab_map, token_bytes

from ..xtok_fixtures import GEMMA_STYLE, SAMPLE, hand_student, hand_teacher, real_pair, trained_pair, tulu_rows


@pytest.fixture(scope="module")
def hand():
    return hand_teacher(), hand_student()


@pytest.fixture(scope="module")
def trained():
    if not SAMPLE.exists():
        pytest.skip(f"Tulu sample {SAMPLE} not found (set KDCACHE_TULU_SAMPLE)")
    return trained_pair()


def _cached(teacher, messages, example_id="ex-1"):
    """What the cache holds for `messages`: the teacher's rendering and its trained positions."""
    t = ChatTemplater(teacher).score({"id": example_id, "messages": messages})
    return t.input_ids, t.target_positions


def _t(text: str) -> StudentTemplate:
    """A template as the trainer hands it to the Aligner (resolved)."""
    return StudentTemplate(text, "test")


def _chat(reply: str) -> list[dict]:
    return [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]


def test_known_sentence_spans(hand):
    """'Hello world!': teacher Hell|o|Ġworld|!|<|im_end|>, student He|llo|▁wor|ld|!|<end_of_turn>.
    Common boundaries at bytes 0, 5, 11, 12 of the message: spans (Hell o | He llo), (Ġworld |
    ▁wor ld), (! | !); the two end-of-turn tokens are different template text: unaligned."""
    teacher, student = hand
    t_ids, t_pos = _cached(teacher, _chat("Hello world!"))
    a = Aligner(teacher, student, _t(GEMMA_STYLE)).align("ex-1", _chat("Hello world!"), t_ids, t_pos)

    def toks(tok, ids, positions):
        return [tok.convert_ids_to_tokens(int(ids[p])) for p in positions]

    assert toks(teacher, t_ids, t_pos) == ["Hell", "o", "Ġworld", "!", "<|im_end|>"]
    assert toks(student, a.input_ids, a.target_positions) == ["He", "llo", "▁wor", "ld", "!", "<end_of_turn>"]
    assert [(toks(teacher, t_ids, tp), toks(student, a.input_ids, sp)) for tp, sp in a.spans] == [
        (["Hell", "o"], ["He", "llo"]),
        (["Ġworld"], ["▁wor", "ld"]),
        (["!"], ["!"]),
    ]
    # Each span's first student token is paired with its first teacher token's row (same text before both).
    assert a.teacher_row.tolist() == [0, -1, 2, -1, 3, -1]
    assert a.one_to_one.tolist() == [False, False, False, False, True, False]
    assert a.aligned_fraction == pytest.approx(3 / 6)
    assert student.chat_template is None  # the template was given to a copy


def test_multibyte_characters(hand):
    """The teacher splits 😀 after its third byte (ðŁĺ | Ģ), the student keeps it whole: no common
    boundary inside the character, so both teacher pieces merge into one 2:1 span. 日本 is six single
    bytes for the teacher and one piece for the student: one 6:1 span."""
    teacher, student = hand
    msgs = _chat("😀日本!")
    t_ids, t_pos = _cached(teacher, msgs)
    a = Aligner(teacher, student, _t(GEMMA_STYLE)).align("ex-1", msgs, t_ids, t_pos)
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    shapes = [(len(tp), len(sp)) for tp, sp in a.spans]
    assert shapes == [(2, 1), (6, 1), (1, 1)]
    for tp, sp in a.spans:  # each span spells the same bytes on both sides
        assert b"".join(t_bytes[t_ids[p]] for p in tp) == b"".join(s_bytes[a.input_ids[p]] for p in sp)
    assert b"".join(t_bytes[t_ids[p]] for p in a.spans[0][0]) == "😀".encode()


def test_same_split_inside_a_character_is_a_boundary(trained):
    """Byte-level BPE and byte fallback both cut an unseen emoji into its 4 bytes: the contexts before
    each byte are the same text on both sides, so each byte is its own 1:1 span (and they map)."""
    teacher, student = trained
    msgs = _chat("ok 😀")
    t_ids, t_pos = _cached(teacher, msgs)
    a = Aligner(teacher, student, _t(GEMMA_STYLE)).align("ex-1", msgs, t_ids, t_pos)
    t_bytes = token_bytes(teacher)
    emoji_spans = [(tp, sp) for tp, sp in a.spans if (t_bytes[t_ids[tp[0]]][:1] or b" ")[0] >= 0x80]
    assert [(len(tp), len(sp)) for tp, sp in emoji_spans] == [(1, 1)] * 4
    vmap = build_vocab_map(teacher, student)
    for tp, sp in emoji_spans:
        assert vmap[t_ids[tp[0]]] == a.input_ids[sp[0]]


def test_self_alignment_is_the_identity(trained):
    """A cached example aligned to the teacher's own tokenizer and template: the same input_ids and
    trained positions, every position its own 1:1 span, aligned fraction 1.0 (the special tokens of
    the template included, since both sides render them identically)."""
    teacher, _ = trained
    aligner = Aligner(teacher, teacher)
    for row in tulu_rows(12):
        t_ids, t_pos = _cached(teacher, row["messages"], row["id"])
        a = aligner.align(row["id"], row["messages"], t_ids, t_pos)
        np.testing.assert_array_equal(a.input_ids, t_ids)
        np.testing.assert_array_equal(a.target_positions, t_pos)
        np.testing.assert_array_equal(a.teacher_row, np.arange(len(t_pos)))
        assert a.one_to_one.all() and a.aligned_fraction == 1.0


def test_trained_pair_on_tulu_rows(trained):
    """Another tokenizer on real text: most student positions aligned; every span spells the same
    bytes; spans are disjoint and increasing."""
    teacher, student = trained
    aligner = Aligner(teacher, student, _t(GEMMA_STYLE))
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    fractions = []
    for row in tulu_rows(12):
        t_ids, t_pos = _cached(teacher, row["messages"], row["id"])
        a = aligner.align(row["id"], row["messages"], t_ids, t_pos)
        fractions.append(a.aligned_fraction)
        last = (-1, -1)
        for tp, sp in a.spans:
            assert b"".join(t_bytes[t_ids[p]] for p in tp) == b"".join(s_bytes[a.input_ids[p]] for p in sp)
            assert tp[0] > last[0] and sp[0] > last[1]
            last = (tp[-1], sp[-1])
    # 600- and 500-token vocabularies share few pieces: measured min 0.26, mean 0.69 on these rows.
    assert min(fractions) > 0.2 and np.mean(fractions) > 0.6, fractions


def test_truncated_student_aligns_what_it_has(hand):
    teacher, student = hand
    msgs = _chat("Hello world!")
    t_ids, t_pos = _cached(teacher, msgs)
    full = Aligner(teacher, student, _t(GEMMA_STYLE)).align("ex-1", msgs, t_ids, t_pos)
    cut = Aligner(teacher, student, _t(GEMMA_STYLE), max_length=int(full.target_positions[2]) + 1).align(
        "ex-1", msgs, t_ids, t_pos
    )
    assert cut.spans == full.spans[:1] and cut.teacher_row.tolist() == [0, -1, -1]


def test_student_targets_map_one_to_one_rows(hand):
    """The '!' span is 1:1: its teacher row's ids translate to student ids (exact); the other
    aligned rows keep raw teacher logprobs (ULD rows); unaligned rows have nothing."""
    teacher, student = hand
    msgs = _chat("Hello world!")
    t_ids, t_pos = _cached(teacher, msgs)
    a = Aligner(teacher, student, _t(GEMMA_STYLE)).align("ex-1", msgs, t_ids, t_pos)
    vocab_t = teacher.get_vocab()
    topk_ids = np.array(
        [
            [vocab_t["Hell"], vocab_t["He"]],
            [vocab_t["o"], -1],
            [vocab_t["Ġworld"], vocab_t["!"]],
            [vocab_t["!"], vocab_t["Ġworld"]],
            [vocab_t["<|im_end|>"], vocab_t["!"]],
        ],
        np.int32,
    )
    topk_lp = np.log(np.array([[0.6, 0.3], [0.9, 1], [0.5, 0.1], [0.7, 0.2], [0.8, 0.1]], np.float32))
    topk_lp[1, 1] = -np.inf  # padding
    vmap = build_vocab_map(teacher, student)
    got = student_targets(a, topk_ids, topk_lp, vmap, "hybrid")
    assert got.exact.tolist() == [False, False, False, False, True, False]
    assert got.aligned.tolist() == [True, False, True, False, True, False]
    vocab_s = student.get_vocab()
    assert got.topk_ids[4].tolist() == [vocab_s["!"], -1]  # Ġworld has no single student twin
    np.testing.assert_array_equal(got.topk_logprobs[4], topk_lp[3])
    np.testing.assert_array_equal(got.topk_logprobs[0], topk_lp[0])
    assert (got.topk_ids[~got.exact] == -1).all() and np.isneginf(got.topk_logprobs[1]).all()
    assert not student_targets(a, topk_ids, topk_lp, vmap, "uld").exact.any()
    with pytest.raises(InputError, match="mode must be one of"):
        student_targets(a, topk_ids, topk_lp, vmap, "gold")


# --- hostile and broken inputs: clear errors that name the example ---


def test_base_student_without_template_names_the_option(hand):
    teacher, student = hand
    with pytest.raises(InputError, match="--student-template"):
        Aligner(teacher, student)


def test_template_that_drops_the_assistant_message(hand):
    teacher, student = hand
    msgs = _chat("Hello world!")
    t_ids, t_pos = _cached(teacher, msgs)
    drop_turn = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    with pytest.raises(InputError, match=r"example 'ex-1'.*cannot render"):
        Aligner(teacher, student, _t(drop_turn)).align("ex-1", msgs, t_ids, t_pos)
    drop_content = GEMMA_STYLE.replace(
        "{{ m['content'] }}", "{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}"
    )
    with pytest.raises(InputError, match=r"example 'ex-1', assistant turn 0: the student's tokens .* do not spell"):
        Aligner(teacher, student, _t(drop_content)).align("ex-1", msgs, t_ids, t_pos)


def test_tokens_that_do_not_cover_the_text(hand):
    """A student without byte fallback turns 'ß' into <unk>: its tokens no longer spell the message."""
    teacher, _ = hand
    msgs = _chat("Hello ß world!")
    t_ids, t_pos = _cached(teacher, msgs)
    with pytest.raises(InputError, match=r"example 'ex-9', assistant turn 0: the student's tokens"):
        Aligner(teacher, hand_student(byte_fallback=False), _t(GEMMA_STYLE)).align("ex-9", msgs, t_ids, t_pos)


def test_teacher_turn_that_ends_like_the_message_begins(hand):
    """Only a side cut by max_length may hold just the start of the message: 'Hello world!H' against
    a message 'Hello there' is not a match of its last 'H'."""
    teacher, student = hand
    t_ids, t_pos = _cached(teacher, _chat("Hello world!H"))
    with pytest.raises(InputError, match=r"example 'ex-4', assistant turn 0: the teacher's tokens"):
        Aligner(teacher, student, _t(GEMMA_STYLE)).align("ex-4", _chat("Hello there"), t_ids, t_pos[:-1])


def test_cache_tokens_of_another_conversation(hand):
    teacher, student = hand
    t_ids, t_pos = _cached(teacher, _chat("Hello world!"))
    with pytest.raises(InputError, match=r"example 'ex-2', assistant turn 0: the teacher's tokens"):
        Aligner(teacher, student, _t(GEMMA_STYLE)).align("ex-2", _chat("Goodbye!"), t_ids, t_pos)
    two_turns = [5] + t_pos.tolist()  # a second run of trained positions (in the user turn), one message
    with pytest.raises(InputError, match=r"example 'ex-2'.* 2 assistant turn\(s\) but the conversation has 1"):
        Aligner(teacher, student, _t(GEMMA_STYLE)).align("ex-2", _chat("Hello world!"), t_ids, np.array(two_turns))


def test_message_content_that_is_not_text(hand):
    teacher, student = hand
    t_ids, t_pos = _cached(teacher, _chat("Hello world!"))
    msgs = _chat("Hello world!")
    msgs[1]["content"] = ["Hello", "world!"]
    with pytest.raises(InputError, match=r"example 'ex-6'"):
        Aligner(teacher, student, _t(GEMMA_STYLE)).align("ex-6", msgs, t_ids, t_pos)


def test_teacher_ids_outside_the_teacher_vocabulary(hand):
    teacher, student = hand
    t_ids, t_pos = _cached(teacher, _chat("Hello world!"))
    bad = t_ids.copy()
    bad[t_pos[0]] = 10**6
    with pytest.raises(InputError, match=r"example 'ex-3': teacher token id 1000000 is outside"):
        Aligner(teacher, student, _t(GEMMA_STYLE)).align("ex-3", _chat("Hello world!"), bad, t_pos)


# --- the real pair (slow: the Gemma 3 tokenizer takes ~30 s to load from its GGUF) ---


@pytest.mark.slow
def test_smollm2_to_gemma3_on_tulu():
    """SmolLM2's byte-level BPE (the cache) against Gemma 3's SentencePiece vocabulary (the student),
    on 40 Tulu rows: measured 2026-11-30 a pooled aligned fraction 0.962 (min per example 0.76)."""
    teacher, student, template = real_pair()
    aligner = Aligner(teacher, student, _t(template))
    aligned = total = 0
    for row in tulu_rows(40):
        t_ids, t_pos = _cached(teacher, row["messages"], row["id"])
        a = aligner.align(row["id"], row["messages"], t_ids, t_pos)
        assert a.aligned_fraction > 0.6, (row["id"], a.aligned_fraction)
        aligned += int((a.teacher_row >= 0).sum())
        total += len(a.teacher_row)
    assert aligned / total > 0.9


# --- the prefetch hook: cached examples in, student examples out ---


def _teacher_example(teacher, messages, example_id="ex-1", k=2, seed=0, with_messages=True):
    """A cached Example for `messages`: the teacher's rendering and a made-up top-k per trained token."""
    from formats.example import Example

    t_ids, t_pos = _cached(teacher, messages, example_id)
    rng = np.random.default_rng(seed)
    topk_ids = np.stack([np.r_[t_ids[p], rng.choice(len(teacher), k - 1, replace=False)] for p in t_pos]).astype(
        np.int32
    )
    lps = np.log(np.tile(np.array([0.7] + [0.2 / (k - 1)] * (k - 1), np.float32), (len(t_pos), 1)))
    meta = {"messages": messages} if with_messages else {}
    return Example(example_id, t_ids, t_pos, topk_ids, lps, lps[:, 0].copy(), np.ones(len(t_pos), np.int32), meta=meta)


def test_student_example_packs_for_xtok_loss(hand):
    """student_example's rows carry the kinds themselves: packed by data.pack_batch, xtok_loss with
    the masks it derives equals xtok_loss with the masks from student_targets."""
    import torch

    from train_student.xtok.align import student_example
    from train_student.data import pack_batch
    from train_student.xtok.loss import xtok_loss

    teacher, student = hand
    ex = _teacher_example(teacher, _chat("Hello world!"))
    vmap = build_vocab_map(teacher, student)
    aligner = Aligner(teacher, student, _t(GEMMA_STYLE))
    got = student_example(ex, aligner, vmap, "hybrid")
    a = aligner.align(ex.id, ex.meta["messages"], ex.input_ids, ex.target_positions)
    targets = student_targets(a, ex.topk_ids, ex.topk_logprobs, vmap, "hybrid")
    np.testing.assert_array_equal(got.input_ids, a.input_ids)
    np.testing.assert_array_equal(got.topk_ids, targets.topk_ids)
    assert got.meta["aligned_fraction"] == a.aligned_fraction == 0.5
    assert got.target_ranks.tolist() == [0, 0, 0, 0, 1, 0]  # '!' is its own teacher top-1, mapped
    assert np.isnan(got.target_logprobs[0]) and got.target_logprobs[4] == pytest.approx(np.log(0.7))

    batch = pack_batch([got], k=2)
    rows = got.target_positions.astype(np.int64) - 1
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch.input_ids.shape[1], 4, dtype=torch.float64, generator=gen)
    weight = torch.randn(len(student), 4, dtype=torch.float64, generator=gen)
    derived, m = xtok_loss(hidden, weight, batch.topk_ids, batch.topk_logprobs.double(), batch.labels, ce_weight=0.1)
    exact = torch.zeros(len(batch.labels), dtype=torch.bool)
    aligned = torch.zeros_like(exact)
    exact[rows], aligned[rows] = torch.from_numpy(targets.exact), torch.from_numpy(targets.aligned)
    explicit, _ = xtok_loss(
        hidden, weight, batch.topk_ids, batch.topk_logprobs.double(), batch.labels, exact, aligned, ce_weight=0.1
    )
    assert float(derived) == float(explicit)
    assert (int(m["n_exact"]), int(m["n_uld"]), int(m["n_aligned"])) == (1, 2, 3)


def test_align_stream_runs_ahead_and_reraises(hand):
    from train_student.xtok.align import align_stream, student_example

    teacher, student = hand
    vmap = build_vocab_map(teacher, student)
    aligner = Aligner(teacher, student, _t(GEMMA_STYLE))
    examples = [
        _teacher_example(teacher, _chat(text), f"ex-{i}", seed=i) for i, text in enumerate(["Hello world!", "Hi!"])
    ]
    streamed = list(align_stream(examples, aligner, vmap, "hybrid", ahead=1))
    assert [e.id for e in streamed] == ["ex-0", "ex-1"]
    for got, ex in zip(streamed, examples):
        np.testing.assert_array_equal(got.topk_ids, student_example(ex, aligner, vmap, "hybrid").topk_ids)
    broken = examples[:1] + [_teacher_example(teacher, _chat("Hi!"), "ex-7", with_messages=False)]
    stream = align_stream(broken, aligner, vmap, "hybrid", ahead=1)
    assert next(stream).id == "ex-0"
    with pytest.raises(InputError, match=r"example 'ex-7': the cache has no conversation messages"):
        next(stream)


def test_template_that_trims_the_message(hand):
    """The student's template strips the reply's surrounding whitespace, the teacher's does not: the
    region is the stripped text on both sides (not the teacher's ' Hello' against the student's 'Hello')."""
    teacher, student = hand
    msgs = _chat(" Hello world!\n")
    t_ids, t_pos = _cached(teacher, msgs)
    trim = GEMMA_STYLE.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
    a = Aligner(teacher, student, _t(trim)).align("ex-5", msgs, t_ids, t_pos)
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    assert a.spans
    for tp, sp in a.spans:
        assert b"".join(t_bytes[t_ids[p]] for p in tp) == b"".join(s_bytes[a.input_ids[p]] for p in sp)
    assert b"".join(s_bytes[a.input_ids[p]] for tp, sp in a.spans for p in sp) == b"Hello world!"


def test_aligner_renders_what_check_student_rendering_decided(hand):
    """The Aligner takes the resolved template and the BOS rule of check_student_rendering: a template
    without `{{ bos_token }}` for a student whose model needs <bos> gets it prepended, positions shifted
    by one, the same ids render_conversation gives; the teacher rows paired are unchanged."""
    from train_student.xtok.template import check_student_rendering, render_conversation

    teacher, student = hand
    msgs = _chat("Hello world!")
    t_ids, t_pos = _cached(teacher, msgs)
    no_bos = _t(GEMMA_STYLE.replace("{{ bos_token }}", ""))
    record = check_student_rendering(student, no_bos, SimpleNamespace(bos_token_id=student.bos_token_id))
    assert record["bos"] == "prepended"
    plain = Aligner(teacher, student, no_bos).align("ex-1", msgs, t_ids, t_pos)
    shifted = Aligner(teacher, student, no_bos, bos_id=record["bos_token_id"]).align("ex-1", msgs, t_ids, t_pos)
    assert shifted.input_ids[0] == student.bos_token_id and plain.input_ids[0] != student.bos_token_id
    assert shifted.input_ids[1:].tolist() == plain.input_ids.tolist()
    assert shifted.target_positions.tolist() == (plain.target_positions + 1).tolist()
    assert shifted.teacher_row.tolist() == plain.teacher_row.tolist()
    assert (
        shifted.input_ids.tolist()
        == render_conversation(student, no_bos, msgs, bos_id=record["bos_token_id"]).input_ids.tolist()
    )
    # a rendering that already starts with the BOS gets none added
    rendered = Aligner(teacher, student, _t(GEMMA_STYLE), bos_id=student.bos_token_id).align("ex-1", msgs, t_ids, t_pos)
    assert rendered.input_ids.tolist() == shifted.input_ids.tolist()
