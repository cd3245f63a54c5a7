"""Tokenizer identity: what makes a cache's token ids mean the same thing to the teacher that wrote
them and the student trained on them (the manifest's `tokenizer` entry and `teacher.output_size`).

Both stages use this module: the teacher records the identity, the student compares against it.
Transformers is imported lazily, only by the functions that load something.
"""

from __future__ import annotations

import hashlib
import json
import os

from formats.errors import FormatError, InputError


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """`AutoTokenizer.from_pretrained`, with an InputError that says what to give instead."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as exc:  # a missing folder, no hub access, a typo in the id
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise InputError(
            f"cannot load the tokenizer of {name_or_path!r}: {str(exc).splitlines()[0]} — give a local checkpoint "
            "folder (`kdcache prepare-teacher smollm2-135m-instruct --out DIR` makes the offline one) or a hub id"
            + (" (HF_HUB_OFFLINE=1 is set: only locally cached hub models load)" if offline else "")
        ) from None


def chat_template_sha256(tokenizer) -> str:
    template = tokenizer.chat_template
    return template_text_sha256(template if isinstance(template, str) else json.dumps(template, sort_keys=True))


def template_text_sha256(text: str | None) -> str:
    """The identity of a chat template's Jinja source (the teacher's in the manifest, the student's in a run)."""
    return hashlib.sha256((text or "").encode()).hexdigest()


FINGERPRINT_VERSION = 2  # what `tokenizer_info` records; a manifest without tokenizer.fingerprint_version holds v1
FINGERPRINT_VERSIONS = (1, 2)
BACKEND_PARTS = ("normalizer", "pre_tokenizer", "decoder", "added_tokens", "model")  # of the tokenizers JSON


def tokenizer_fingerprint(tokenizer, version: int = FINGERPRINT_VERSION) -> str:
    """sha256 of what makes the tokenizer's ids mean the same tokens (equal iff they do).

    v1 (caches written before `tokenizer.fingerprint_version`): the sorted vocabulary (token, id) and
    the special tokens. v2: those, and the parts of a fast tokenizer's definition (the `tokenizers`
    JSON, `backend_tokenizer.to_str()`) that change the bytes of a token or the ids a text becomes:
    normalizer, pre_tokenizer, decoder, added_tokens (with their flags) and model (type, vocab,
    merges, options). The post_processor (which special tokens `encode` adds; transformers rebuilds it
    on load), truncation and padding are left out. Canonical JSON (sorted keys; merges as pairs, as
    tokenizers >= 0.20 writes them; null and false options dropped, as newer tokenizers add options
    that default to off). A slow tokenizer (no `backend_tokenizer`) hashes what it has instead: its
    class name and its sentencepiece model or BPE ranks, when present.
    """
    if version not in FINGERPRINT_VERSIONS:
        raise ValueError(f"fingerprint version {version!r}: one of {FINGERPRINT_VERSIONS}")
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    specials = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    digest.update(json.dumps(specials, sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    if version >= 2:
        digest.update(b"\nv2\n")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            definition = json.loads(backend.to_str())
            parts = _canonical({part: definition.get(part) for part in BACKEND_PARTS})
            digest.update(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode())
        else:
            digest.update(type(tokenizer).__name__.encode())
            sp_model = getattr(tokenizer, "sp_model", None)
            if hasattr(sp_model, "serialized_model_proto"):
                digest.update(sp_model.serialized_model_proto())
            ranks = getattr(tokenizer, "bpe_ranks", None)
            if isinstance(ranks, dict):
                digest.update(
                    json.dumps(sorted([list(pair), rank] for pair, rank in ranks.items()), ensure_ascii=False).encode()
                )
    return digest.hexdigest()


def _canonical(value):
    """`value` (decoded tokenizers JSON) without null or false dict entries, merges as [left, right] pairs."""
    if isinstance(value, dict):
        out = {key: _canonical(item) for key, item in value.items() if item is not None and item is not False}
        if isinstance(out.get("merges"), list):
            out["merges"] = [m.split(" ", 1) if isinstance(m, str) else m for m in out["merges"]]
        return out
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    return value


def fingerprint_version(entry: dict | None) -> int:
    """The fingerprint version a manifest's `tokenizer` entry records (1 when it records none)."""
    version = (entry or {}).get("fingerprint_version", 1)
    if type(version) is not int or version not in FINGERPRINT_VERSIONS:
        raise FormatError(
            f"tokenizer.fingerprint_version {version!r}: this kdcache knows versions "
            f"{', '.join(map(str, FINGERPRINT_VERSIONS))}; upgrade kdcache to read this cache"
        )
    return version


def manifest_fingerprint(tokenizer, entry: dict | None) -> str:
    """`tokenizer`'s fingerprint at the version a manifest's `tokenizer` entry records: what every
    comparison with a recorded `tokenizer.fingerprint` computes."""
    return tokenizer_fingerprint(tokenizer, fingerprint_version(entry))


def fingerprint_matches(tokenizer, entry: dict | None) -> bool:
    """Whether `tokenizer` has the fingerprint a manifest's `tokenizer` entry records (v1 or v2);
    False when it records none (the caller decides what that means)."""
    recorded = (entry or {}).get("fingerprint")
    return bool(recorded) and manifest_fingerprint(tokenizer, entry) == recorded


def identity_differences(tokenizer, entry: dict | None) -> list[str]:
    """The fields of a manifest's `tokenizer` entry that `tokenizer` does not have: "fingerprint",
    "chat_template_sha256", "vocab_size", in that order; a field the entry does not record is skipped."""
    entry = entry or {}
    differ = []
    if entry.get("fingerprint") and not fingerprint_matches(tokenizer, entry):
        differ.append("fingerprint")
    if entry.get("chat_template_sha256") and chat_template_sha256(tokenizer) != entry["chat_template_sha256"]:
        differ.append("chat_template_sha256")
    if entry.get("vocab_size") is not None and vocab_size(tokenizer) != entry["vocab_size"]:
        differ.append("vocab_size")
    return differ


def vocab_size(tokenizer) -> int:
    """Tokens the tokenizer knows, added tokens included (the manifest's `tokenizer.vocab_size`)."""
    return len(tokenizer.get_vocab())


def tokenizer_info(tokenizer, name_or_path: str) -> dict:
    """The manifest's `tokenizer` entry."""
    return {
        "name_or_path": str(name_or_path),
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "fingerprint_version": FINGERPRINT_VERSION,
        "vocab_size": vocab_size(tokenizer),
        "chat_template_sha256": chat_template_sha256(tokenizer),
    }


def model_output_size(name_or_path: str, revision: str | None = None) -> int | None:
    """Rows of a model's LM head (its config's vocab_size): the range of the ids it can emit, which
    can exceed the tokenizer's vocabulary (padded heads: OLMo 2, Qwen2.5). The teacher records it as
    `teacher.output_size`; the writer range-checks ids and sizes id codes with it. None when the
    config cannot be read (the writer then uses 4-byte codes and the tokenizer's size)."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError):
        return None
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    size = getattr(text_config, "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None
