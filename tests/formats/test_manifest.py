"""formats/manifest.py: check_manifest and its parts (every field's type, bound and message), load_manifest on
a folder that is not a complete cache, the row and id limits a manifest implies, the reject tallies, and
new_manifest. End-to-end attacks on whole caches are in test_hostile_cache.py and the mutation fuzzer; these
call the module's functions directly on real manifests."""

from __future__ import annotations

import copy
import hashlib
import os
import re
import sys

import numpy as np
import pytest

from formats.codec import MAX_TOKEN_ID, CodecConfig
from formats.errors import FormatError
from formats.manifest import (
    MAX_MANIFEST_BYTES,
    MAX_TOKENIZER_FILE_BYTES,
    MAX_TOKENIZER_FILES,
    check_accounting,
    check_int,
    check_manifest,
    check_sha256,
    check_tokenizer_files,
    command_line,
    id_limits,
    load_manifest,
    manifest_get,
    new_manifest,
    now_iso,
    open_cache,
    reason_code,
    row_limits,
    sha256_file,
    tally_reasons,
    teacher_output_size,
)
from formats.trust import CacheFiles

from .format_helpers import make_example, write_cache

WHERE = "/caches/c/manifest.json"
SHA = "ab" * 32


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A real cache (several shards, two rejects) and its manifest, written once for the module."""
    path = tmp_path_factory.mktemp("manifest") / "cache"
    rng = np.random.default_rng(7)
    write_cache(
        path,
        [make_example(rng, i) for i in range(12)],
        rejects=[("bad-1", "no assistant turn"), ("bad-2", "unknown role: 'bot'")],
        shard_max_bytes=2000,
    )
    return path, load_manifest(path)


@pytest.fixture
def manifest(written):
    """A fresh copy of the real manifest, to damage."""
    return copy.deepcopy(written[1])


def refused(manifest, pattern: str) -> str:
    with pytest.raises(FormatError) as info:
        check_manifest(manifest, WHERE)
    message = str(info.value)
    assert message.startswith(f"{WHERE}: ") and re.search(pattern, message), message
    return message


# ---- the real manifest, and new_manifest ---------------------------------------------------


def test_a_written_manifest_passes_and_has_several_shards(written):
    path, manifest = written
    check_manifest(manifest, WHERE)
    assert len(manifest["shards"]) >= 2 and manifest["counts"]["examples"] == 12
    assert manifest["rejects_file"]["count"] == 2 == manifest["counts"]["rejects"]


def test_new_manifest_puts_unknown_provenance_keys_under_extra(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/kdcache", "cache", "--k", "8"])
    codec = CodecConfig(k=8).to_dict()
    m = new_manifest(codec, {"teacher": {"name_or_path": "t"}, "mode": "generate", "template": {"max_length": 9}})
    assert m["k"] == 8 and m["codec"] == codec and m["mode"] == "generate"
    assert m["teacher"] == {"name_or_path": "t"} and m["tokenizer"] == {} and m["dataset"] == {}
    assert m["extra"] == {"template": {"max_length": 9}}
    assert m["command"] == "kdcache cache --k 8" and m["counts"] == {} and m["shards"] == []
    check_manifest(m, WHERE)  # an empty cache's manifest is a valid one


def test_new_manifest_keeps_a_recorded_command():
    m = new_manifest(CodecConfig(k=2).to_dict(), {"command": "kdcache merge out a b"})
    assert m["command"] == "kdcache merge out a b" and m["mode"] == "score" and "command" not in m["extra"]


def test_command_line_is_the_program_name_and_its_arguments(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/kdcache", "verify", "/data/c"])
    assert command_line() == "kdcache verify /data/c"
    monkeypatch.setattr(sys, "argv", [])
    assert command_line() == ""


def test_now_iso_is_utc_seconds():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", now_iso())


def test_sha256_file_hashes_in_chunks(tmp_path):
    data = bytes(range(256)) * 5
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=7) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_open_cache_returns_a_cache_files_as_it_is(tmp_path):
    files = CacheFiles(tmp_path)
    assert open_cache(files) is files
    assert isinstance(open_cache(tmp_path), CacheFiles)


# ---- load_manifest on folders that are not (yet) a cache ------------------------------------


def test_load_manifest_of_a_folder_without_one_asks_whether_it_is_a_cache(tmp_path):
    with pytest.raises(FormatError, match=rf"{re.escape(str(tmp_path))}: no manifest.json \(is this a kdcache cache"):
        load_manifest(tmp_path)


def test_load_manifest_of_an_unfinished_job_says_to_resume(tmp_path):
    (tmp_path / "_progress").mkdir()
    with pytest.raises(FormatError, match="has not finished: rerun the same command to resume"):
        load_manifest(tmp_path)


def test_an_oversized_manifest_is_refused_by_its_size_before_it_is_read(tmp_path):
    with open(tmp_path / "manifest.json", "wb") as f:  # sparse: 64 MiB + 1 that cost nothing to write
        f.truncate(MAX_MANIFEST_BYTES + 1)
    with pytest.raises(FormatError, match=rf"manifest.json: {MAX_MANIFEST_BYTES + 1} bytes, more than the"):
        load_manifest(tmp_path)


def test_a_manifest_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(FormatError, match="manifest.json: a folder, not a plain file"):
        load_manifest(tmp_path)


def test_a_symlinked_manifest_is_refused(written, tmp_path):
    os.symlink(written[0] / "manifest.json", tmp_path / "manifest.json")
    with pytest.raises(FormatError, match="manifest.json: a symlink"):
        load_manifest(tmp_path)


def test_a_manifest_that_is_not_utf8_json_names_the_file(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b'{"format_version": 1, \xff}')
    with pytest.raises(
        FormatError, match=rf"^{re.escape(str(tmp_path))}/manifest.json: the manifest is not valid JSON: not UTF-8"
    ):
        load_manifest(tmp_path)


# ---- check_manifest: each field ----------------------------------------------------------


def test_not_an_object():
    with pytest.raises(FormatError, match=rf"^{WHERE}: not a JSON object"):
        check_manifest([1, 2], WHERE)


def test_missing_required_keys_are_listed(manifest):
    del manifest["counts"], manifest["shards"]
    refused(manifest, r"missing keys \['shards', 'counts'\]")


@pytest.mark.parametrize("version", [3, 0, True, 1.0, "1", "2", None])
def test_format_version_must_be_the_integer_1_or_2(manifest, version):
    manifest["format_version"] = version
    refused(manifest, "format version .* is not supported .* reads versions 1, 2")


def test_the_format_version_must_be_the_codecs(manifest):
    """Version 2 caches hold codec v2's streams, version 1 caches v1's: another pairing is refused."""
    assert manifest["format_version"] == 2 and manifest["codec"]["name"] == "kdcache-topk-v2"
    check_manifest({**manifest, "format_version": 1, "codec": {**manifest["codec"], "name": "kdcache-topk-v1"}}, WHERE)
    manifest["format_version"] = 1
    refused(manifest, "format version 1 with codec kdcache-topk-v2 .*version 1 caches use kdcache-topk-v1")


def test_top_level_k_must_equal_codec_k(manifest):
    manifest["k"] = 9
    refused(manifest, "k is 9 but codec.k is 8")
    manifest["k"] = 8.0
    refused(manifest, "k is 8.0 but codec.k is 8")
    del manifest["k"]
    check_manifest(manifest, WHERE)  # absent is fine: codec.k is what counts


def test_the_codec_is_checked_with_the_manifests_name(manifest):
    manifest["codec"]["name"] = "other-codec"
    refused(manifest, "codec: unknown codec 'other-codec'")


def test_mode_must_be_score_or_generate(manifest):
    manifest["mode"] = "train"
    refused(manifest, r"mode is 'train', must be one of \('score', 'generate'\)")


@pytest.mark.parametrize("key", ["teacher", "tokenizer", "dataset", "extra", "counts"])
def test_sections_must_be_objects(manifest, key):
    manifest[key] = ["x"]
    refused(manifest, f"{key} must be a JSON object, got list")


@pytest.mark.parametrize("section, key", [("tokenizer", "vocab_size"), ("teacher", "output_size")])
@pytest.mark.parametrize("value", [0, -1, MAX_TOKEN_ID + 1, True, 1000.0, "1000"])
def test_vocabulary_sizes_are_positive_integers_that_fit_int32(manifest, section, key, value):
    manifest[section][key] = value
    refused(manifest, rf"{section}.{key} is .*: must be an integer in 1..{MAX_TOKEN_ID}")


@pytest.mark.parametrize("key", ["examples", "positions", "rejects", "bytes", "inputs"])
def test_counts_are_non_negative_integers(manifest, key):
    manifest["counts"][key] = -1
    refused(manifest, rf"counts.{key} is -1: must be an integer in 0..")
    manifest["counts"][key] = False
    refused(manifest, rf"counts.{key} is False")


@pytest.mark.parametrize("value", ["114.3", None, True, [1]])
def test_bytes_per_position_is_a_number(manifest, value):
    manifest["counts"]["bytes_per_position"] = value
    refused(manifest, "counts.bytes_per_position is .*, must be a number")


@pytest.mark.parametrize("value", [{"x": True}, {"x": -1}, {"x": 1.0}, ["x"], {"x": 2**53 + 1}])
def test_rejects_by_reason_maps_reasons_to_counts(manifest, value):
    manifest["counts"]["rejects_by_reason"] = value
    refused(manifest, "counts.rejects_by_reason must map reasons to integers")


def test_shards_must_be_a_list_of_objects(manifest):
    shards = manifest["shards"]
    manifest["shards"] = {"0": shards[0]}
    refused(manifest, "shards must be a list of objects, got dict")
    manifest["shards"] = ["part-00000.parquet"]
    refused(manifest, r"shards\[0\] must be an object")


def test_a_shard_without_a_file_name_is_refused(manifest):
    del manifest["shards"][1]["file"]
    refused(manifest, r"shards\[1\].file None points outside the cache folder")


def test_a_shard_name_must_end_in_parquet(manifest):
    manifest["shards"][0]["file"] = "part-00000.csv"
    refused(manifest, r"shards\[0\].file 'part-00000.csv' must end with .parquet")


@pytest.mark.parametrize("key", ["rows", "positions", "bytes"])
def test_shard_sizes_are_non_negative_integers(manifest, key):
    manifest["shards"][1][key] = -3
    refused(manifest, rf"shards\[1\].{key} is -3: must be an integer in 0..")


@pytest.mark.parametrize("value", ["AB" * 32, "ab" * 31, "g" * 64, None, 12])
def test_shard_sha256_is_64_lowercase_hex_digits(manifest, value):
    manifest["shards"][0]["sha256"] = value
    refused(manifest, r"shards\[0\].sha256 is .*: must be 64 lowercase hex digits")


def test_a_shard_listed_twice_names_both_entries(manifest):
    manifest["shards"][1]["file"] = manifest["shards"][0]["file"]
    refused(manifest, r"shards\[0\] \(part-00000.parquet\) and shards\[1\] \(part-00000.parquet\): listed twice")


def test_two_shards_with_the_same_sha256_are_refused(manifest):
    manifest["shards"][1]["sha256"] = manifest["shards"][0]["sha256"]
    refused(manifest, r"shards\[0\] .* and shards\[1\] .*: the same sha256, so their rows would be read twice")


@pytest.mark.parametrize("key, total", [("examples", "rows"), ("positions", "positions"), ("bytes", "bytes")])
def test_counts_must_equal_the_shards_sums(manifest, key, total):
    listed = sum(s[total] for s in manifest["shards"])
    manifest["counts"][key] = listed + 1
    if key == "examples":
        manifest["counts"].pop("inputs", None)
    refused(manifest, rf"the shards list {listed} {key} \(shards\[\].{total}\), counts.{key} says {listed + 1}")


def test_rejects_file_must_be_an_object(manifest):
    manifest["rejects_file"] = "rejects.jsonl"
    refused(manifest, "rejects_file must be an object with file, count, sha256")


@pytest.mark.parametrize("name", ["manifest.json", "README.md", "part-00000.parquet"])
def test_rejects_file_cannot_name_the_manifest_the_card_or_a_shard(manifest, name):
    manifest["rejects_file"]["file"] = name
    refused(manifest, rf"rejects_file.file '{re.escape(name)}' names a shard, the manifest or the card")


def test_rejects_file_fields_are_checked(manifest):
    manifest["rejects_file"]["file"] = "../rejects.jsonl"
    refused(manifest, "rejects_file.file '../rejects.jsonl' points outside")
    manifest["rejects_file"].update(file="rejects.jsonl", count="2")
    refused(manifest, "rejects_file.count is '2'")
    manifest["rejects_file"].update(count=2, sha256="")
    refused(manifest, "rejects_file.sha256 is ''")


def test_an_unknown_fingerprint_version_is_named_with_the_file(manifest):
    manifest["tokenizer"]["fingerprint_version"] = 3
    refused(manifest, "tokenizer.fingerprint_version 3: this kdcache knows versions 1, 2")


def test_tokenizer_files_are_checked_inside_check_manifest(manifest):
    manifest["tokenizer_files"] = [{"file": "tokenizer.json", "bytes": 10, "sha256": SHA}]
    check_manifest(manifest, WHERE)
    manifest["tokenizer_files"][0]["file"] = "../tokenizer.json"
    refused(manifest, r"tokenizer_files\[0\].file '../tokenizer.json' points outside")


def test_a_limit_under_extra_is_checked(manifest):
    manifest["extra"]["template"] = {"max_length": 0}
    with pytest.raises(FormatError, match="extra.template.max_length is 0: must be an integer in 1.."):
        check_manifest(manifest, WHERE)


def test_a_bad_limit_under_extra_names_the_manifests_path(manifest):
    manifest["extra"]["sampling"] = {"max_new_tokens": "64"}
    refused(manifest, "extra.sampling.max_new_tokens is '64'")


# ---- check_accounting ----------------------------------------------------------------------


def test_accounting_requires_examples_plus_rejects_to_be_the_inputs():
    m = {"counts": {"examples": 10, "rejects": 2, "inputs": 12}, "rejects_file": {"count": 2}}
    check_accounting(m, WHERE)
    m["counts"]["inputs"] = 13
    with pytest.raises(FormatError, match=rf"{WHERE}: 10 examples \+ 2 rejects != 13 inputs \(counts.inputs\)"):
        check_accounting(m, WHERE)


def test_accounting_without_recorded_inputs_checks_only_the_rejects_file():
    check_accounting({"counts": {"examples": 10, "rejects": 2}}, WHERE)  # merged caches: no inputs
    with pytest.raises(FormatError, match="rejects_file.count 3 != counts.rejects 2"):
        check_accounting({"counts": {"examples": 10, "rejects": 2}, "rejects_file": {"count": 3}}, WHERE)


def test_accounting_is_checked_by_check_manifest(manifest):
    manifest["counts"]["inputs"] = manifest["counts"]["examples"] + manifest["counts"]["rejects"] + 1
    refused(manifest, "the cache does not account for every input")


# ---- check_tokenizer_files -----------------------------------------------------------------


def entry(name="tokenizer.json", size=100, sha=SHA):
    return {"file": name, "bytes": size, "sha256": sha}


def test_tokenizer_files_absent_is_fine_and_a_valid_list_passes():
    check_tokenizer_files(None, WHERE)
    check_tokenizer_files([entry(), entry("tokenizer_config.json", 0)], WHERE)


@pytest.mark.parametrize("entries", [[], {"file": "x"}, "tokenizer.json", [entry(f"f{i}") for i in range(65)]])
def test_tokenizer_files_is_a_list_of_1_to_64(entries):
    with pytest.raises(FormatError, match=rf"tokenizer_files must be a list of 1..{MAX_TOKENIZER_FILES} objects"):
        check_tokenizer_files(entries, WHERE)


def test_tokenizer_file_entries_are_checked_one_by_one():
    cases = [
        (["tokenizer.json"], r"tokenizer_files\[0\] must be an object"),
        ([entry(), entry("tokenizer/x.json")], r"tokenizer_files\[1\].file 'tokenizer/x.json' points outside"),
        ([entry(size=MAX_TOKENIZER_FILE_BYTES + 1)], rf"tokenizer_files\[0\].bytes is .*0..{MAX_TOKENIZER_FILE_BYTES}"),
        ([entry(size=True)], r"tokenizer_files\[0\].bytes is True"),
        ([entry(sha="0" * 63)], r"tokenizer_files\[0\].sha256 is"),
        ([entry(), entry()], r"tokenizer_files\[1\].file 'tokenizer.json' is listed twice"),
    ]
    for entries, pattern in cases:
        with pytest.raises(FormatError, match=pattern):
            check_tokenizer_files(entries, WHERE)


# ---- check_int, check_sha256 ---------------------------------------------------------------


def test_check_int_returns_the_value_within_bounds():
    assert check_int(0, "x", 0, 5) == 0 and check_int(5, "x", 0, 5) == 5


@pytest.mark.parametrize("value", [6, -1, True, 3.0, "3", None])
def test_check_int_refuses_out_of_range_and_non_integers(value):
    with pytest.raises(FormatError, match=r"^counts.x is .*: must be an integer in 0..5; the manifest is damaged$"):
        check_int(value, "counts.x", 0, 5)


def test_check_int_shows_a_long_value_cut_and_escaped():
    with pytest.raises(FormatError) as info:
        check_int("\x1b[31m" + "9" * 500, "f", 0, 5)
    shown = str(info.value).split(" is ", 1)[1].split(": must", 1)[0]
    assert len(shown) == 80 and "\x1b" not in shown and shown.startswith("'\\x1b[31m")


def test_check_sha256():
    check_sha256(hashlib.sha256(b"x").hexdigest(), "f")
    with pytest.raises(FormatError, match="^f is 'x': must be 64 lowercase hex digits"):
        check_sha256("x", "f")


# ---- limits a manifest implies -------------------------------------------------------------


def test_teacher_output_size_prefers_the_output_layer_and_falls_back_to_the_vocabulary():
    assert teacher_output_size({"teacher": {"output_size": 1024}, "tokenizer": {"vocab_size": 1000}}) == 1024
    assert teacher_output_size({"teacher": {}, "tokenizer": {"vocab_size": 1000}}) == 1000
    assert teacher_output_size({"teacher": None, "tokenizer": None}) is None
    assert teacher_output_size({}) is None


def test_id_limits_bound_topk_by_the_output_size_and_inputs_by_the_larger():
    limits = id_limits({"teacher": {"output_size": 100352}, "tokenizer": {"vocab_size": 100278}})
    assert limits["topk"] == (100352, "the teacher's output size 100352 (teacher.output_size)")
    assert limits["input"][0] == 100352
    older = id_limits({"tokenizer": {"vocab_size": 1000}})  # written before output_size was recorded
    assert older["topk"][0] == 1000 and "no teacher.output_size" in older["topk"][1]
    assert id_limits({})["topk"][0] is None and id_limits({})["input"][0] is None


def test_row_limits_of_a_score_mode_cache():
    limits = row_limits({"extra": {"template": {"max_length": 512}, "sampling": {"max_new_tokens": 64}}})
    assert limits["mode"] == "score" and limits["max_tokens"] == 512 and limits["finish_reasons"] == {None}


def test_row_limits_of_a_generate_mode_cache_add_the_new_tokens():
    m = {"mode": "generate", "extra": {"template": {"max_length": 512}, "sampling": {"max_new_tokens": 64}}}
    limits = row_limits(m)
    assert limits["max_tokens"] == 576 and limits["finish_reasons"] == {"stop", "length"}
    del m["extra"]["sampling"]  # one of the two unknown: no bound
    assert row_limits(m)["max_tokens"] is None


def test_row_limits_without_settings_bound_nothing():
    assert row_limits({"extra": {"template": "not an object"}})["max_tokens"] is None
    assert row_limits({})["max_tokens"] is None


# ---- small helpers -------------------------------------------------------------------------


def test_manifest_get_follows_objects_only():
    m = {"extra": {"template": {"max_length": 9}, "sampling": [1]}}
    assert manifest_get(m, ("extra", "template", "max_length")) == 9
    assert manifest_get(m, ("extra", "missing", "x")) is None
    assert manifest_get(m, ("extra", "sampling", "n")) is None


def test_reason_codes_are_the_text_before_the_first_colon():
    assert reason_code("unknown role: 'bot': twice") == "unknown role"
    assert reason_code("no assistant turn") == "no assistant turn"
    rejects = [{"reason": "too long: 5000 tokens"}, {"reason": "too long: 6000"}, {"reason": "empty"}]
    assert tally_reasons(rejects) == {"too long": 2, "empty": 1}
    assert tally_reasons([]) == {}


def test_load_manifest_checks_what_it_reads_and_names_the_path(written, tmp_path):
    import json

    manifest = copy.deepcopy(written[1])
    manifest["shards"][0]["rows"] = "12"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=rf"^{re.escape(str(tmp_path))}/manifest.json: shards\[0\].rows is '12'"):
        load_manifest(tmp_path)
    assert load_manifest(written[0]) == written[1]


def test_load_manifest_refuses_an_object_of_too_many_keys_before_checking_it(written, tmp_path):
    """A million junk keys took a merge 9 s to parse, check, carry over and re-encode (a fuzz 'hang' on a
    loaded machine); any object of a manifest holds at most MAX_MANIFEST_OBJECT_KEYS keys."""
    import json

    from formats.manifest import MAX_MANIFEST_OBJECT_KEYS

    manifest = copy.deepcopy(written[1])
    manifest["extra"] = {f"k{i}": 0 for i in range(MAX_MANIFEST_OBJECT_KEYS + 1)}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        FormatError, match=rf"manifest.json: the manifest: an object of {MAX_MANIFEST_OBJECT_KEYS + 1} keys"
    ):
        load_manifest(tmp_path)
    manifest["extra"] = {f"k{i}": 0 for i in range(MAX_MANIFEST_OBJECT_KEYS)}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert load_manifest(tmp_path)["extra"] == manifest["extra"]  # at the bound: read


# ---- provenance: the teacher's weights, the dataset's revision and configuration, license, version --------
PROVENANCE = {
    "teacher": {"name_or_path": "org/teacher", "revision": "a" * 40, "weights_sha256": SHA},
    "dataset": {"name": "org/data", "config": "default", "revision": "b" * 40},
    "license": {"id": "odc-by", "source": "--license"},
    "kdcache_version": "0.1.0",
}


def with_provenance(manifest: dict) -> dict:
    for key, value in copy.deepcopy(PROVENANCE).items():
        manifest[key] = {**manifest[key], **value} if isinstance(value, dict) and key in manifest else value
    manifest["teacher"]["weight_files"] = {"model.safetensors": SHA}
    return manifest


def test_new_manifest_keeps_license_and_kdcache_version_at_the_top():
    m = new_manifest(
        CodecConfig(k=2).to_dict(), {"license": {"id": "mit", "source": "--license"}, "kdcache_version": "9"}
    )
    assert m["license"] == {"id": "mit", "source": "--license"} and m["kdcache_version"] == "9" and m["extra"] == {}
    assert "license" not in new_manifest(CodecConfig(k=2).to_dict(), {})  # not recorded: absent, as in old caches


def test_a_manifest_with_the_provenance_fields_passes(manifest):
    check_manifest(with_provenance(manifest), WHERE)


def test_a_manifest_written_before_the_provenance_fields_loads(written):
    """The module's cache records none of them (format_helpers' writer provenance): it loads as before."""
    path, m = written
    assert "license" not in m and "kdcache_version" not in m and "weights_sha256" not in m["teacher"]
    assert load_manifest(path) == m


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda m: m["teacher"].update(revision=["main"]), r"teacher.revision is \['main'\]: must be text"),
        (lambda m: m["teacher"].update(revision="x" * 1025), r"teacher.revision is .*at most 1024 characters"),
        (lambda m: m["teacher"].update(commit=False), r"teacher.commit is False: must be text"),
        (lambda m: m["dataset"].update(config={"a": 1}), r"dataset.config is .*must be text"),
        (lambda m: m["dataset"].update(revision=7), r"dataset.revision is 7"),
        (lambda m: m.update(kdcache_version=1.0), r"kdcache_version is 1.0"),
        (lambda m: m["teacher"].update(weights_sha256="AB" * 32), r"teacher.weights_sha256 is .*64 lowercase hex"),
        (lambda m: m["teacher"].update(weight_files=[SHA]), r"teacher.weight_files must map 1..10000"),
        (lambda m: m["teacher"].update(weight_files={}), r"teacher.weight_files must map"),
        (lambda m: m["teacher"].update(weight_files={"m.bin": "x"}), r"teacher.weight_files\['m.bin'\] is 'x'"),
        (lambda m: m["teacher"].update(weight_files={"n" * 256: SHA}), r"a teacher.weight_files name is"),
        (lambda m: m.update(license="odc-by"), r"license is 'odc-by': must be \{\"id\""),
        (lambda m: m["license"].update(id="mit\n---\nx: y"), r"license is .*mit\\n---\\nx: y.*: must be"),
        (lambda m: m["license"].update(id=["mit"] * 17), r"license is"),
        (lambda m: m["license"].update(id=[]), r"license is"),
        (lambda m: m["license"].update(source=["x"]), r"license.source is \['x'\]"),
    ],
    ids=lambda x: "" if callable(x) else x[:30],
)
def test_provenance_fields_of_the_wrong_type_or_size_are_refused(manifest, edit, pattern):
    manifest = with_provenance(manifest)
    edit(manifest)
    refused(manifest, pattern)


@pytest.mark.parametrize("value", ["odc-by", "Apache-2.0", "cc-by-4.0", "GPL-3.0+", ["mit", "odc-by"], None])
def test_license_ids_are_spdx_or_hub_ids(manifest, value):
    manifest = with_provenance(manifest)
    manifest["license"]["id"] = value
    check_manifest(manifest, WHERE)
