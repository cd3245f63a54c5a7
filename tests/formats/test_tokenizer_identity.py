"""issue 19, item 5: the tokenizer a cache's `tokenizer/` files load must be the one its manifest records
(fingerprint v2, chat-template hash, vocabulary size), even when the files' sizes and sha256 in
`tokenizer_files` were fixed up after an edit: `check_tokenizer_identity` (what `kdcache verify` calls)
and `load_cache_tokenizer` refuse it with a FormatError. Old manifests (fingerprint v1) still match."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from formats.errors import FormatError
from formats.manifest import load_manifest
from formats.tokenizer_files import TOKENIZER_DIR, add_tokenizer, check_tokenizer_identity, load_cache_tokenizer
from formats.tokenizer_id import (
    FINGERPRINT_VERSION,
    _canonical,
    fingerprint_matches,
    fingerprint_version,
    tokenizer_fingerprint,
    tokenizer_info,
)

from ..tokenizer_helpers import tiny_tokenizer
from .format_helpers import edit_manifest
from . import test_tokenizer_files as files

# The tokenizer-file tests' fixtures, shared (pytest finds fixtures by module attribute).
tokenizer, tokenizer_dir, cache = files.tokenizer, files.tokenizer_dir, files.cache
old_cache = files.old_cache


def fix_up(cache: Path) -> None:
    """Record the current size and sha256 of every file in tokenizer/, so only the identity check can object."""

    def edit(manifest):
        for entry in manifest["tokenizer_files"]:
            data = (cache / TOKENIZER_DIR / entry["file"]).read_bytes()
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    edit_manifest(cache, edit)


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, ensure_ascii=False))


def _swap_tokenizer_json(folder: Path):
    other = folder.parent.parent / "other"
    tiny_tokenizer(vocab_size=280).save_pretrained(other)
    (folder / "tokenizer.json").write_bytes((other / "tokenizer.json").read_bytes())


def _edit_template(folder: Path):
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        jinja.write_text(jinja.read_text() + "{{ '' }}")
    else:
        edit_json(folder / "tokenizer_config.json", lambda c: c.update(chat_template=c["chat_template"] + "{{ '' }}"))


def _metaspace_decoder(folder: Path):
    edit_json(
        folder / "tokenizer.json",
        lambda t: t.update(
            decoder={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
        ),
    )


def _rename_merge_token(folder: Path):
    edit_json(folder / "tokenizer.json", lambda t: t["model"]["merges"].__setitem__(0, ["Ġ", "not-a-token"]))


TAMPERS = {  # name -> (edit of the cache's tokenizer/ folder, text the FormatError must hold)
    "tokenizer.json swapped": (_swap_tokenizer_json, "another fingerprint than tokenizer.fingerprint"),
    "chat template edited": (_edit_template, "tokenizer.chat_template_sha256"),
    "eos changed": (
        lambda f: edit_json(f / "tokenizer_config.json", lambda c: c.update(eos_token="<|im_start|>")),
        "another fingerprint than tokenizer.fingerprint",
    ),
    "decoder changed": (_metaspace_decoder, r"another fingerprint than tokenizer.fingerprint \(v2: .*decoder"),
    "merge token renamed": (_rename_merge_token, r"do not load \(Exception: Token `not-a-token` out of vocabulary"),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_an_edited_tokenizer_folder_is_refused(cache, tamper):
    edit, text = TAMPERS[tamper]
    edit(cache / TOKENIZER_DIR)
    fix_up(cache)
    with pytest.raises(FormatError, match=rf"{cache}/tokenizer: .*{text}"):
        check_tokenizer_identity(cache, load_manifest(cache))
    with pytest.raises(FormatError, match="restore tokenizer/ from the source"):
        load_cache_tokenizer(cache)


def test_the_untouched_cache_passes(cache, tokenizer):
    manifest = load_manifest(cache)
    assert manifest["tokenizer"]["fingerprint_version"] == FINGERPRINT_VERSION == 2
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tokenizer)
    check_tokenizer_identity(cache, manifest)
    fix_up(cache)  # a no-op
    check_tokenizer_identity(cache, load_manifest(cache))


def test_a_cache_without_tokenizer_files_has_nothing_to_check(tmp_path, tokenizer, rng):
    path = old_cache(tmp_path / "old", tokenizer, rng)
    check_tokenizer_identity(path, load_manifest(path))


def _as_v1(manifest):
    """The tokenizer entry as written before fingerprint_version: no version, a v1 fingerprint."""
    manifest["tokenizer"].pop("fingerprint_version")
    manifest["tokenizer"]["fingerprint"] = tokenizer_fingerprint(tiny_tokenizer(), version=1)


def test_an_old_manifest_with_a_v1_fingerprint_still_matches(cache, tmp_path, tokenizer, tokenizer_dir, rng):
    assert tokenizer_fingerprint(tokenizer, version=1) != tokenizer_fingerprint(tokenizer, version=2)
    edit_manifest(cache, _as_v1)
    entry = load_manifest(cache)["tokenizer"]
    assert fingerprint_version(entry) == 1 and fingerprint_matches(tokenizer, entry)
    check_tokenizer_identity(cache, load_manifest(cache))
    assert load_cache_tokenizer(cache).get_vocab() == tokenizer.get_vocab()
    edit_json(cache / TOKENIZER_DIR / "tokenizer_config.json", lambda c: c.update(eos_token="<|im_start|>"))
    fix_up(cache)
    with pytest.raises(FormatError, match=r"another fingerprint than tokenizer.fingerprint \(v1: "):
        check_tokenizer_identity(cache, load_manifest(cache))
    # add-tokenizer matches an old cache's v1 fingerprint too
    path = old_cache(tmp_path / "old", tokenizer, rng)
    edit_manifest(path, _as_v1)
    add_tokenizer(path, str(tokenizer_dir))
    check_tokenizer_identity(path, load_manifest(path))


def test_an_unknown_fingerprint_version_is_refused(cache):
    edit_manifest(cache, lambda m: m["tokenizer"].update(fingerprint_version=3))
    with pytest.raises(FormatError, match="tokenizer.fingerprint_version 3: this kdcache knows versions 1, 2"):
        check_tokenizer_identity(cache, load_manifest(cache))


def test_tokenizer_info_records_the_version(tokenizer):
    info = tokenizer_info(tokenizer, "tiny")
    assert info["fingerprint_version"] == 2 and fingerprint_matches(tokenizer, info)
    assert not fingerprint_matches(tokenizer, {**info, "fingerprint_version": 1})
    assert not fingerprint_matches(tokenizer, {k: v for k, v in info.items() if k != "fingerprint"})


def test_v2_covers_what_changes_token_bytes_and_v1_does_not(tokenizer):
    from tokenizers import decoders, normalizers, pre_tokenizers

    edits = {
        "decoder": lambda b: setattr(b, "decoder", decoders.Metaspace()),
        "normalizer": lambda b: setattr(b, "normalizer", normalizers.NFKC()),
        "pre_tokenizer": lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.Whitespace()),
    }
    for part, edit in edits.items():
        changed = copy.deepcopy(tokenizer)
        edit(changed.backend_tokenizer)
        assert tokenizer_fingerprint(changed, version=1) == tokenizer_fingerprint(tokenizer, version=1), part
        assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(tokenizer), part
    assert tokenizer_fingerprint(copy.deepcopy(tokenizer)) == tokenizer_fingerprint(tokenizer)


def test_v2_survives_save_and_load(tmp_path):
    from transformers import AutoTokenizer

    from ..train_student.xtok_fixtures import unigram

    for name, tok in {
        "bpe": tiny_tokenizer(bos="<bos>", add_bos=True),
        "unigram": unigram(texts=["a b c hello"] * 4, vocab_size=40),
    }.items():
        tok.save_pretrained(tmp_path / name)
        assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / name)) == tokenizer_fingerprint(tok), name


def test_canonical_json_is_stable_across_tokenizers_versions():
    # tokenizers < 0.20 wrote merges as "a b"; newer versions add options that default to off
    old = {"model": {"type": "BPE", "merges": ["a b", "ab c"], "vocab": {"a": 0}}}
    new = {
        "model": {
            "type": "BPE",
            "merges": [["a", "b"], ["ab", "c"]],
            "vocab": {"a": 0},
            "ignore_merges": False,
            "dropout": None,
        }
    }
    assert _canonical(old) == _canonical(new)
    assert _canonical({"x": {"add_prefix_space": True}}) != _canonical({"x": {"add_prefix_space": False}})
