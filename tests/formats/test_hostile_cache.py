"""A received cache is untrusted (issue 19): each attack found by the adversarial review, as a regression
test through the public readers (verify, CacheReader, merge, add-tokenizer, inspect). Each failed on the
code before formats/trust.py and formats/safe_write.py."""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from formats import CacheReader, CacheWriter, CodecConfig, Example
from formats.errors import ChecksumError, FormatError, KDCacheError
from formats.manifest import load_manifest
from formats.tokenizer_files import add_tokenizer
from formats.tokenizer_id import tokenizer_info
from formats.tools import merge_caches, summarize, verify_cache

from ..tokenizer_helpers import tiny_tokenizer
from .format_helpers import (
    PROVENANCE,
    assert_same_topk,
    edit_manifest,
    make_example,
    replace_column,
    rewrite_shard,
    write_cache,
)


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s: unbounded work")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def raw_manifest(cache: Path, text: str) -> None:
    (cache / "manifest.json").write_text(text)


# ---- 1. nothing kdcache writes follows a link ---------------------------------------------------


@pytest.fixture
def tokenizer_cache(tmp_path, rng):
    """A cache without tokenizer files (as written before they were stored) and its tokenizer's folder."""
    tok = tiny_tokenizer()
    folder = tmp_path / "tok"
    tok.save_pretrained(folder)
    path = tmp_path / "cache"
    write_cache(
        path,
        [make_example(rng, i) for i in range(6)],
        output_size=1000,
        provenance={**PROVENANCE, "tokenizer": tokenizer_info(tok, "tiny")},
    )
    return path, folder


@pytest.mark.parametrize("planted", ["README.md", "manifest.json.tmp"])
def test_add_tokenizer_never_writes_through_a_planted_symlink(tokenizer_cache, tmp_path, planted):
    cache, folder = tokenizer_cache
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (cache / planted).unlink(missing_ok=True)
    (cache / planted).symlink_to(victim)
    add_tokenizer(cache, str(folder))
    assert victim.read_text() == "precious\n"
    assert not (cache / "README.md").is_symlink()
    if planted == "README.md":  # replaced by a plain file; a planted manifest.json.tmp is left as it was
        verify_cache(cache)
    else:
        assert (cache / planted).is_symlink()


def test_a_teacher_name_cannot_add_lines_to_the_card(tmp_path, rng):
    prov = {**PROVENANCE, "teacher": {**PROVENANCE["teacher"], "name_or_path": "evil\n# Injected heading\n\x1b[31m"}}
    write_cache(tmp_path / "c", [make_example(rng, i) for i in range(3)], provenance=prov)
    card = (tmp_path / "c" / "README.md").read_text()
    assert "\n# Injected heading" not in card and "\x1b" not in card


# ---- 2. names are checked after every decoding a transport applies ----------------------------


@pytest.mark.parametrize(
    "name",
    [
        "%2e%2e%2fsecret.parquet",
        "..%2fsecret.parquet",
        "a\\b.parquet",
        "\x1b[31mred.parquet",
        ".hidden.parquet",
        "x" * 300 + ".parquet",
    ],
)
def test_shard_names_outside_the_safe_alphabet_are_refused(cache, name):
    edit_manifest(cache, lambda m: m["shards"][0].update(file=name))
    with pytest.raises(FormatError, match="shards\\[0\\].file") as info:
        load_manifest(cache)
    assert "\x1b" not in str(info.value)


# ---- 3. every reader (training's) checks sizes, hashes and the values it relies on ------------


def test_the_reader_refuses_a_shard_rewritten_after_its_manifest(cache, rng):
    shard = cache / load_manifest(cache)["shards"][0]["file"]
    other = cache.parent / "other"
    write_cache(other, [make_example(rng, i, prefix="o") for i in range(40)])
    shard.write_bytes((other / load_manifest(other)["shards"][0]["file"]).read_bytes())
    with pytest.raises(ChecksumError, match=shard.name):
        list(CacheReader(cache))


def test_the_reader_checks_the_hash_even_when_the_size_is_right(cache):
    shard = cache / load_manifest(cache)["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[8] ^= 1  # inside the first column chunk (after the 4-byte magic), not the footer the reader parses first
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="sha256"):
        list(CacheReader(cache))


def test_no_verify_skips_the_hash_but_not_the_bounds(cache):
    def zeros(table, name):
        return replace_column(table, name, [b"\0" * len(v.as_py()) for v in table.column(name)])

    def all_mass_at_zero(table):  # every entry at logprob 0: a top-k mass of k (one tie group: codes 0 + gaps 0)
        for name in [n for n in table.column_names if n.startswith(("topk_step_", "topk_code_b"))] + ["topk_top1"]:
            table = zeros(table, name) if name != "topk_step_escape" else table
        return table

    rewrite_shard(cache, 0, edit_table=all_mass_at_zero)
    for verify in (True, False):
        with pytest.raises(FormatError, match="top-k mass"):
            list(CacheReader(cache, verify=verify))
    with pytest.raises(FormatError, match="top-k mass"):
        verify_cache(cache, check_values=False)


def test_counts_that_disagree_with_the_shards_are_refused_by_every_reader(cache):
    edit_manifest(cache, lambda m: m["counts"].update(examples=m["counts"]["examples"] + 5))
    with pytest.raises(FormatError, match="counts.examples"):
        CacheReader(cache)


# ---- 4. only regular files the manifest lists -------------------------------------------------


def test_a_symlinked_shard_is_refused_by_verify_reader_and_merge(cache, tmp_path):
    name = load_manifest(cache)["shards"][0]["file"]
    outside = tmp_path / "outside.parquet"
    os.replace(cache / name, outside)
    (cache / name).symlink_to(outside)
    for action in (verify_cache, lambda c: list(CacheReader(c)), lambda c: merge_caches(tmp_path / "m", [c])):
        with pytest.raises(FormatError, match=f"{name}.*symlink"):
            action(cache)
    assert not (tmp_path / "m" / f"w000-{name}").exists()


def test_an_unlisted_parquet_file_is_refused_and_the_card_names_only_listed_shards(cache):
    first = load_manifest(cache)["shards"][0]["file"]
    (cache / "part-00099.parquet").write_bytes((cache / first).read_bytes())
    with pytest.raises(FormatError, match="part-00099.parquet: a Parquet file the manifest does not list"):
        verify_cache(cache)
    card = (cache / "README.md").read_text()
    assert "*.parquet" not in card and f"- {first}" in card and "part-00099" not in card


def test_a_manifest_entry_naming_a_folder_is_refused(cache):
    name = load_manifest(cache)["shards"][0]["file"]
    (cache / name).unlink()
    (cache / name).mkdir()
    for action in (verify_cache, lambda c: list(CacheReader(c))):
        with pytest.raises(FormatError, match=f"{name}: a folder, not a plain file"):
            action(cache)


def test_unlisted_other_files_are_reported(cache):
    (cache / "notes.txt").write_text("hi")
    assert verify_cache(cache)["unlisted"] == ["notes.txt"]


# ---- 6. every shard's self-description against the manifest -----------------------------------


def test_rows_longer_than_the_manifests_max_length_are_refused(tmp_path, rng):
    prov = {**PROVENANCE, "template": {"max_length": 64}}
    write_cache(tmp_path / "c", [make_example(rng, i) for i in range(6)], provenance=prov)
    list(CacheReader(tmp_path / "c"))
    edit_manifest(tmp_path / "c", lambda m: m["extra"]["template"].update(max_length=5))
    with pytest.raises(FormatError, match="more than the 5"):
        list(CacheReader(tmp_path / "c"))


def test_a_finish_reason_in_a_score_mode_cache_is_refused(cache):
    rewrite_shard(cache, 0, edit_table=lambda t: replace_column(t, "finish_reason", ["stop"] * t.num_rows))
    with pytest.raises(FormatError, match="finish_reason 'stop' in a score-mode cache"):
        list(CacheReader(cache))


@pytest.mark.parametrize(
    "edit,text",
    [
        (lambda c: c.update(logprob_step=1 / 16), "logprob_step"),
        (lambda c: c.update(future_option=1), "does not know"),
    ],
)
def test_codec_parameters_are_checked_not_ignored(cache, edit, text):
    def both(m):
        edit(m["codec"])

    edit_manifest(cache, both)
    rewrite_shard(
        cache,
        0,
        edit_metadata=lambda meta: {
            **meta,
            "codec": {
                **meta["codec"],
                **({"logprob_step": 1 / 16} if text == "logprob_step" else {"future_option": 1}),
            },
        },
    )
    with pytest.raises(FormatError, match=text):
        list(CacheReader(cache))


def test_extra_columns_are_refused(cache):
    import pyarrow as pa

    rewrite_shard(cache, 0, edit_table=lambda t: t.append_column("payload", pa.array([b"x" * 10] * t.num_rows)))
    with pytest.raises(FormatError, match="payload"):
        list(CacheReader(cache))


# ---- 7. printed text is escaped -----------------------------------------------------------------


def test_inspect_escapes_terminal_sequences(cache):
    edit_manifest(cache, lambda m: m["teacher"].update(name_or_path="\x1b]0;pwned\x07\x1b[2J"))
    text = summarize(cache)
    assert "\x1b" not in text and "\x07" not in text and "\\x1b" in text


# ---- 8. bounded work: no FIFOs, devices or endless files --------------------------------------


@pytest.mark.parametrize("target", ["shard", "rejects"])
@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_special_files_never_hang_a_reader(cache, target, kind):
    m = load_manifest(cache)
    name = m["shards"][0]["file"] if target == "shard" else m["rejects_file"]["file"]
    (cache / name).unlink()
    if kind == "fifo":
        os.mkfifo(cache / name)
    else:
        (cache / name).symlink_to("/dev/zero")
    if target == "shard":

        def claim_empty(m):  # "bytes: 0", consistent with counts.bytes: only the file itself can tell
            m["counts"]["bytes"] -= m["shards"][0]["bytes"]
            m["shards"][0]["bytes"] = 0

        edit_manifest(cache, claim_empty)
    with deadline(20):
        for check_values in (True, False):
            with pytest.raises(FormatError, match=name):
                verify_cache(cache, check_values=check_values)
        with pytest.raises(FormatError, match=name):
            merge_caches(cache.parent / "merged", [cache]) if target == "rejects" else list(CacheReader(cache))


# ---- 9. decompression bombs and claimed sizes ---------------------------------------------------


def test_a_meta_cell_that_expands_hugely_is_refused_before_it_expands(cache):
    bomb = json.dumps({"messages": "a" * (80 << 20)})
    rewrite_shard(
        cache, 0, edit_table=lambda t: replace_column(t, "meta", [bomb] + [None] * (t.num_rows - 1)), compression="zstd"
    )
    assert (cache / load_manifest(cache)["shards"][0]["file"]).stat().st_size < 1 << 20  # 80 MB in a small file
    with pytest.raises(FormatError, match="decompression bomb"):
        verify_cache(cache)


def test_a_huge_k_with_short_rows_decodes_no_wider_than_its_rows(tmp_path, rng):
    exs = []
    for i in range(5):
        ex = make_example(rng, i, k=1)
        exs.append(ex)
    with CacheWriter(tmp_path / "c", codec=CodecConfig(k=65535), provenance=PROVENANCE) as w:
        for ex in exs:
            w.write(ex)
    got = list(CacheReader(tmp_path / "c"))
    assert all(ex.topk_ids.shape[1] == 1 for ex in got)
    verify_cache(tmp_path / "c")


def test_a_manifest_of_millions_of_empty_objects_is_refused_before_parsing(cache):
    raw_manifest(cache, '{"format_version": 1, "shards": [' + ",".join(["{}"] * 3_000_000) + "]}")
    with deadline(20), pytest.raises(FormatError, match="objects/arrays"):
        load_manifest(cache)


# ---- 10. strict JSON: depth, numbers, duplicate keys, exact types -----------------------------


def _with(cache, field_text: str) -> None:
    """The manifest with `"extra": <field_text>` spliced in as raw JSON."""
    m = json.loads((cache / "manifest.json").read_text())
    m["extra"] = "@@"
    raw_manifest(cache, json.dumps(m).replace('"@@"', field_text))


@pytest.mark.parametrize(
    "text,match",
    [
        ("[" * 100_000 + "]" * 100_000, "nests deeper"),
        ('{"n": ' + "9" * 5000 + "}", "digits"),
        ('{"a": 1, "a": 2}', "appears twice"),
        ('{"x": NaN}', "NaN"),
        ('{"x": 1e999}', "overflows"),
    ],
)
def test_json_bombs_and_ambiguities_in_the_manifest_are_format_errors(cache, text, match):
    _with(cache, text)
    with pytest.raises(FormatError, match=match):
        verify_cache(cache)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(format_version=True),
        lambda m: m.update(format_version=1.0),
        lambda m: m.update(k=8.0),
        lambda m: m["counts"].update(rejects_by_reason={"no assistant turn": True, "unknown role": True}),
        lambda m: m.update(mode="stream"),
    ],
)
def test_a_bool_or_float_is_not_an_int(cache, edit):
    edit_manifest(cache, edit)
    with pytest.raises(FormatError):
        load_manifest(cache)


def test_json_bombs_in_a_rows_meta_and_in_the_rejects_are_format_errors(cache):
    from formats.manifest import sha256_file

    deep = "[" * 100_000 + "]" * 100_000
    rewrite_shard(cache, 0, edit_table=lambda t: replace_column(t, "meta", ['{"m": ' + deep + "}"] * t.num_rows))
    with pytest.raises(FormatError, match="meta nests deeper"):
        list(CacheReader(cache))
    rejects = cache / "rejects.jsonl"
    rejects.write_text(
        '{"id": "bad-1", "reason": ' + "[" * 10_000 + "]" * 10_000 + "}\n" + '{"id": "bad-2", "reason": "x"}\n'
    )
    edit_manifest(cache, lambda m: m["rejects_file"].update(sha256=sha256_file(rejects)))
    with pytest.raises(FormatError, match="rejects.jsonl, line 1"):
        from formats.tools import read_rejects

        read_rejects(cache, load_manifest(cache))


def test_every_error_is_a_typed_kdcache_error(cache):
    """A sample of the above through the CLI's error type: nothing escapes as a traceback."""
    raw_manifest(cache, "[" * 100_000)
    with pytest.raises(KDCacheError):
        verify_cache(cache)


def test_examples_round_trip_unchanged(cache, examples):
    """The boundary changes nothing for a sound cache (mass-adaptive rows decode to their widest row)."""
    got = {ex.id: ex for ex in CacheReader(cache)}
    for ex in examples:
        np.testing.assert_array_equal(got[ex.id].input_ids, ex.input_ids)
        assert_same_topk(got[ex.id].topk_ids, got[ex.id].topk_logprobs, ex.topk_ids)
    assert isinstance(next(iter(got.values())), Example)


@pytest.mark.parametrize("column", ["source", "id"])
def test_text_that_is_not_utf8_is_a_format_error(cache, tmp_path, column):
    """A string column whose bytes are not UTF-8 (a byte flip with the checksum fixed up; fuzz case 11:9808):
    Parquet's reader hands them over unchecked and pyarrow's to_pylist raised UnicodeDecodeError, untyped."""
    import pyarrow as pa

    def not_utf8(table):
        n = table.num_rows
        offsets = pa.py_buffer(np.arange(n + 1, dtype=np.int32).tobytes())
        bad = pa.Array.from_buffers(pa.string(), n, [None, offsets, pa.py_buffer(b"\x97" * n)])
        return table.set_column(table.schema.get_field_index(column), column, bad)

    rewrite_shard(cache, 0, edit_table=not_utf8)
    for run in (
        lambda: verify_cache(cache),
        lambda: list(CacheReader(cache)),
        lambda: merge_caches(tmp_path / "m", [cache]),
    ):
        with pytest.raises(FormatError, match=f"column {column} is not valid .*UTF8"):
            run()
