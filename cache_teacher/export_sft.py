"""`kdcache export-sft CACHE OUT.jsonl`: a generate-mode cache back out as a chat dataset.

Each example of a generate-mode cache holds the prompt tokens, the teacher's response tokens (its
trained positions) and, in `meta`, the prompt messages. The response is decoded with the tokenizer the
manifest records (special tokens such as the end-of-turn token dropped) and appended as an assistant
turn: one `{"id", "messages", "source"}` line per response, the input format of `kdcache cache` and of
the student trainer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from formats import CacheReader, InputError, load_manifest
from formats.safe_write import AtomicFile
from formats.tokenizer_id import fingerprint_matches, load_tokenizer


def iter_cache(path) -> Iterator:
    """Every Example of a finished cache, in order."""
    yield from CacheReader(path)


def export_sft(
    cache: str | os.PathLike, out: str | os.PathLike, tokenizer: str | None = None, keep_length: bool = False
) -> int:
    """Write the cache's responses as chat records to `out` (.jsonl); returns how many were written."""
    manifest = load_manifest(cache)
    if manifest.get("mode") != "generate":
        raise InputError(
            f"{cache} is a {manifest.get('mode')!r}-mode cache; export-sft needs a generate-mode cache "
            "(kdcache cache --mode generate)"
        )
    name = tokenizer or manifest.get("tokenizer", {}).get("name_or_path")
    if not name:
        raise InputError(f"{cache}: the manifest records no tokenizer; pass --tokenizer")
    tok = load_tokenizer(name)
    if manifest.get("tokenizer", {}).get("fingerprint") and not fingerprint_matches(tok, manifest["tokenizer"]):
        raise InputError(f"tokenizer {name} is not the one {cache} was made with (fingerprints differ)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with AtomicFile(out.parent, out.name) as fh:  # OUT complete or not at all; never through a link
        for ex in iter_cache(cache):
            if ex.finish_reason != "stop" and not keep_length:
                continue
            messages = ex.meta.get("messages")
            if messages is None:
                raise InputError(f"{cache}: example {ex.id!r} has no prompt messages in its meta")
            messages = messages[: ex.meta.get("prompt_turns", len(messages))]  # without the reply (older caches: none)
            response = tok.decode(ex.input_ids[ex.target_positions], skip_special_tokens=True).strip()
            if not response:
                continue
            record = {
                "id": ex.id,
                "messages": messages + [{"role": "assistant", "content": response}],
                "source": ex.source,
                "finish_reason": ex.finish_reason,
            }
            fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            n += 1
    return n
