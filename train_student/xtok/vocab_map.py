"""What each token stands for in text, and a teacher -> student vocabulary map built from it.

Two tokenizers agree on a token when it stands for the same bytes of text: SmolLM2's byte-level
`Ġthe` (GPT-2's byte-to-unicode alphabet), Gemma's SentencePiece `▁the` and a byte-fallback piece
`<0x20>` followed by `the` all spell the bytes b" the". `token_bytes` gives those bytes for every id
of one tokenizer; `build_vocab_map` joins two such tables on equal bytes (special tokens only with
special tokens); `load_or_build_vocab_map` caches the map on disk keyed by both tokenizer
fingerprints (`formats.tokenizer_id.tokenizer_fingerprint`), because building it for a 262,144-token
student takes about a second. `map_topk` applies the map to cached teacher top-k rows.

numpy only (no torch): this runs in the data pipeline's prefetch thread.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from formats.errors import FormatError
from formats.tokenizer_id import tokenizer_fingerprint

__all__ = ["token_bytes", "special_ids", "build_vocab_map", "load_or_build_vocab_map", "map_topk", "vocab_map_path"]

UNMAPPED = -1
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character standing for each byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_steps(tokenizer) -> list[dict]:
    """The backend tokenizer's decoder as a flat list of steps (a `Sequence` unrolled)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return []
    decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
    return decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]


def special_ids(tokenizer) -> set[int]:
    """Ids of the special tokens (template markers such as `<|im_end|>`, `<bos>`): not message text."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids = {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}
    return ids | {int(i) for i in tokenizer.all_special_ids}


def token_bytes(tokenizer) -> list[bytes]:
    """For each id in [0, max id], the bytes of text the token stands for (b"" for an unused id).

    Byte-level BPE (a `ByteLevel` decoder): each character of the token string is one byte of
    GPT-2's alphabet (`Ġ` = b" "). SentencePiece style: the decoder's `Replace` steps (`▁` -> " ")
    and `Metaspace`, and `<0xNN>` pieces are the byte 0xNN when the decoder has `ByteFallback`.
    Added tokens (special or not) stand for their own text. A tokenizer without a backend
    (a slow tokenizer) is read as SentencePiece style.
    """
    vocab = tokenizer.get_vocab()
    steps = _decoder_steps(tokenizer)
    kinds = {step.get("type") for step in steps}
    replace = [
        (s["pattern"]["String"], s["content"])
        for s in steps
        if s.get("type") == "Replace" and "String" in s.get("pattern", {})
    ]
    replace += [(s.get("replacement", "▁"), " ") for s in steps if s.get("type") == "Metaspace"]
    if not steps:  # slow tokenizer: SentencePiece conventions
        replace, kinds = [("▁", " ")], {"ByteFallback"}
    byte_level = "ByteLevel" in kinds
    byte_decoder = _gpt2_byte_decoder() if byte_level else {}
    added = {int(i): tok.content for i, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()}

    table = [b""] * _table_size(tokenizer)
    for piece, i in vocab.items():
        if i in added:
            table[i] = added[i].encode("utf-8")
        elif byte_level and all(c in byte_decoder for c in piece):
            table[i] = bytes(byte_decoder[c] for c in piece)
        elif "ByteFallback" in kinds and (m := _BYTE_PIECE.match(piece)):
            table[i] = bytes([int(m.group(1), 16)])
        else:
            for old, new in replace:
                piece = piece.replace(old, new)
            table[i] = piece.encode("utf-8")
    return table


def _table_size(tokenizer) -> int:
    """Entries of `token_bytes`' table: one per id up to the largest."""
    vocab = tokenizer.get_vocab()
    return max(vocab.values()) + 1 if vocab else 0


def build_vocab_map(teacher_tokenizer, student_tokenizer) -> np.ndarray:
    """int32 [teacher ids]: the student id that stands for the same bytes, or -1 (UNMAPPED).

    Special tokens map only to special tokens with the same text, ordinary tokens only to ordinary
    ones. A `<0xNN>` byte piece maps to the student's byte piece for that byte and an ordinary piece
    to an ordinary piece when the student has one (so a tokenizer maps to itself exactly), else to
    its twin of the other kind (SmolLM2's byte-level `ð` -> Gemma's `<0xF0>`); among several
    candidates the lowest id wins, so the map is deterministic.
    """
    student_table = token_bytes(student_tokenizer)
    student_special = special_ids(student_tokenizer)
    student_bytes = _byte_piece_ids(student_tokenizer)
    same_kind: dict[tuple[bool, bool, bytes], int] = {}
    any_kind: dict[tuple[bool, bytes], int] = {}
    # Byte pieces last, then by id: the first writer of a key keeps it.
    for i in sorted(range(len(student_table)), key=lambda j: (j in student_bytes, j)):
        if student_table[i]:
            special = i in student_special
            same_kind.setdefault((special, i in student_bytes, student_table[i]), i)
            any_kind.setdefault((special, student_table[i]), i)

    teacher_table = token_bytes(teacher_tokenizer)
    teacher_special = special_ids(teacher_tokenizer)
    teacher_bytes = _byte_piece_ids(teacher_tokenizer)
    out = np.full(len(teacher_table), UNMAPPED, np.int32)
    for i, b in enumerate(teacher_table):
        if b:
            special = i in teacher_special
            out[i] = same_kind.get((special, i in teacher_bytes, b), any_kind.get((special, b), UNMAPPED))
    return out


def _byte_piece_ids(tokenizer) -> set[int]:
    """Ids of the `<0xNN>` byte-fallback pieces (only meaningful with a ByteFallback decoder)."""
    if "ByteFallback" not in {step.get("type") for step in _decoder_steps(tokenizer)} and _decoder_steps(tokenizer):
        return set()
    return {i for piece, i in tokenizer.get_vocab().items() if _BYTE_PIECE.match(piece)}


def vocab_map_path(cache_dir: str | os.PathLike, teacher_fingerprint: str, student_fingerprint: str) -> Path:
    """Where the map of one (teacher, student) tokenizer pair lives: both fingerprints in the name."""
    return Path(cache_dir) / f"vocab_map-{teacher_fingerprint}-{student_fingerprint}.npy"


def load_or_build_vocab_map(teacher_tokenizer, student_tokenizer, cache_dir: str | os.PathLike) -> np.ndarray:
    """The pair's map from `cache_dir` if there, else built and written there (atomically).

    Raises FormatError naming the file when a cached map is unreadable or out of range (delete it
    and it is rebuilt).
    """
    path = vocab_map_path(cache_dir, tokenizer_fingerprint(teacher_tokenizer), tokenizer_fingerprint(student_tokenizer))
    if path.exists():
        return _load_checked(path, _table_size(teacher_tokenizer), _table_size(student_tokenizer))
    vmap = build_vocab_map(teacher_tokenizer, student_tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        np.save(f, vmap, allow_pickle=False)
    os.replace(f.name, path)
    return vmap


def _load_checked(path: Path, teacher_size: int, student_size: int) -> np.ndarray:
    fix = "delete it and it is rebuilt from the two tokenizers"
    try:
        vmap = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise FormatError(f"{path}: not a readable vocabulary map ({exc}); {fix}") from None
    if vmap.dtype != np.int32 or vmap.shape != (teacher_size,):
        raise FormatError(
            f"{path}: expected int32 [{teacher_size}] (one entry per teacher id), got "
            f"{vmap.dtype} {list(vmap.shape)}; {fix}"
        )
    bad = np.flatnonzero((vmap < UNMAPPED) | (vmap >= student_size))
    if len(bad):
        raise FormatError(
            f"{path}: teacher id {int(bad[0])} maps to {int(vmap[bad[0]])}, outside "
            f"[-1, {student_size}) of the student vocabulary; {fix}"
        )
    return vmap


def map_topk(topk_ids: np.ndarray, topk_logprobs: np.ndarray, vmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Teacher top-k rows [N, K] in the student's vocabulary: (student ids, logprobs), both [N, K].

    An entry whose teacher id has no student twin (or is padding, -1, or beyond the map) gets id -1
    and keeps its logprob: the loss treats it as missing, so its mass joins the tail. Two teacher
    entries that map to one student id are merged into the first (log-sum-exp of their logprobs;
    the later one becomes -1 / -inf), so no student id appears twice in a row.
    """
    ids = np.asarray(topk_ids, np.int64)
    inside = (ids >= 0) & (ids < len(vmap))
    mapped = np.where(inside, vmap[np.clip(ids, 0, max(len(vmap) - 1, 0))], UNMAPPED).astype(np.int32)
    logprobs = np.array(topk_logprobs, np.float32, copy=True)
    if mapped.shape[1] > 1:
        sorted_ids = np.sort(mapped, axis=1)
        has_dup = ((sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)).any(axis=1)
        for r in np.flatnonzero(has_dup):  # rare: merge into the first occurrence
            first: dict[int, int] = {}
            for c, sid in enumerate(mapped[r].tolist()):
                if sid < 0:
                    continue
                if sid in first:
                    logprobs[r, first[sid]] = np.logaddexp(logprobs[r, first[sid]], logprobs[r, c])
                    logprobs[r, c], mapped[r, c] = -np.inf, UNMAPPED
                else:
                    first[sid] = c
    return mapped, logprobs
