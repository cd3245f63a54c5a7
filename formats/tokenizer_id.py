"""Tokenizer identity: what makes a cache's token ids mean the same thing to the teacher that wrote
them and the student trained on them (the manifest's `tokenizer` entry and `teacher.output_size`).

Both stages use this module: the teacher records the identity, the student compares against it.
Transformers is imported lazily, only by the functions that load something.
"""
from __future__ import annotations

import hashlib
import json
import os

from formats.errors import InputError


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


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the sorted vocabulary (token, id) and the special tokens: equal iff ids mean the same."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    specials = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    digest.update(json.dumps(specials, sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return digest.hexdigest()


def vocab_size(tokenizer) -> int:
    """Tokens the tokenizer knows, added tokens included (the manifest's `tokenizer.vocab_size`)."""
    return len(tokenizer.get_vocab())


def tokenizer_info(tokenizer, name_or_path: str) -> dict:
    """The manifest's `tokenizer` entry."""
    return {
        "name_or_path": str(name_or_path),
        "fingerprint": tokenizer_fingerprint(tokenizer),
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
