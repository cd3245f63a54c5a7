import json
import os
import subprocess
import sys

import numpy as np
import pytest
from .format_helpers import PROVENANCE, edit_manifest, make_example, replace_column, rewrite_shard, write_cache

from formats import CacheReader, load_manifest
from formats.errors import ChecksumError, FormatError, IncompatibleCachesError, InputError
from formats.tools import merge_caches, show_example, summarize, verify_cache


def kdcache(*args):
    return subprocess.run(
        [sys.executable, "-m", "kdcache.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )


@pytest.mark.multiprocess
def test_verify_passes_a_good_cache(cache):
    r = kdcache("verify", cache)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_single_byte_corruption_is_caught_everywhere(cache, rng):
    for shard in load_manifest(cache)["shards"]:
        path = cache / shard["file"]
        original = path.read_bytes()
        for offset in sorted(set(rng.integers(0, len(original), 4).tolist()) | {0, len(original) - 1}):
            data = bytearray(original)
            data[offset] ^= 0xFF
            path.write_bytes(bytes(data))
            with pytest.raises(ChecksumError, match=shard["file"]):
                verify_cache(cache)
        path.write_bytes(original)
    verify_cache(cache)


@pytest.mark.multiprocess
def test_cli_names_the_bad_shard(cache):
    shard = load_manifest(cache)["shards"][1]["file"]
    with open(cache / shard, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    r = kdcache("verify", cache)
    assert r.returncode == 1
    assert shard in r.stderr and "sha256" in r.stderr and "Traceback" not in r.stderr


def test_truncated_and_missing_shards(cache):
    shards = load_manifest(cache)["shards"]
    first = cache / shards[0]["file"]
    first.write_bytes(first.read_bytes()[:-10])
    with pytest.raises(ChecksumError, match="truncated"):
        verify_cache(cache)
    with pytest.raises(FormatError, match="Parquet|read|truncated"):
        list(CacheReader(cache))
    (cache / shards[1]["file"]).unlink()
    manifest = load_manifest(cache)
    manifest["shards"] = manifest["shards"][1:]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="missing"):
        verify_cache(cache)


def test_value_checks_name_shard_and_row(tmp_path, rng):
    exs = [make_example(rng, i) for i in range(5)]
    exs[3].topk_ids = exs[3].topk_ids.copy()
    exs[3].topk_ids[0, 0] = 999
    exs[3].topk_ids[0, 1] = 999  # the same id twice
    write_cache(tmp_path / "c", exs, row_group_positions=10**6, shard_max_bytes=10**9)
    with pytest.raises(FormatError, match=r"part-00000.parquet, row 3 \(id 'ex3'\).*listed twice"):
        verify_cache(tmp_path / "c")


def test_unknown_version_and_escaping_shard_names(cache):
    m = load_manifest(cache)
    (cache / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(FormatError, match="format version 99 is not supported"):
        CacheReader(cache)
    r = kdcache("inspect", cache)
    assert r.returncode == 1 and "upgrade kdcache" in r.stderr
    bad = dict(m)
    bad["shards"] = [dict(m["shards"][0], file="../../etc/passwd")] + m["shards"][1:]
    (cache / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="outside the cache folder"):
        verify_cache(cache)


def test_merge_equals_one_cache(tmp_path, rng):
    exs = [make_example(rng, i) for i in range(20)]
    write_cache(tmp_path / "a", exs[:12], rejects=[("r1", "no assistant turn")])
    write_cache(tmp_path / "b", exs[12:], rejects=[("r2", "no assistant turn")])
    m = merge_caches(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    verify_cache(tmp_path / "m")
    assert m["counts"]["examples"] == 20 and m["counts"]["rejects"] == 2
    assert sorted(e.id for e in CacheReader(tmp_path / "m")) == sorted(e.id for e in exs)
    assert len(m["merged_from"]) == 2


def test_version_1_caches_stay_readable_and_merge_only_with_version_1(tmp_path, rng):
    """Caches written before format version 2 verify, inspect, read and merge (with each other) as before."""
    exs = [make_example(rng, i) for i in range(12)]
    for name, part in [("v1a", exs[:6]), ("v1b", exs[6:])]:
        assert write_cache(tmp_path / name, part, version=1)["format_version"] == 1
    write_cache(tmp_path / "v2", exs[6:])
    assert verify_cache(tmp_path / "v1a")["examples"] == 6
    assert "v1, codec kdcache-topk-v1" in summarize(tmp_path / "v1a")
    assert "ex2" in show_example(tmp_path / "v1a", "ex2")
    got = {e.id: e for e in CacheReader(tmp_path / "v1a")}
    for ex in exs[:6]:  # version 1 keeps the teacher's order exactly, ties included
        np.testing.assert_array_equal(got[ex.id].topk_ids, ex.topk_ids)
        assert np.abs(got[ex.id].topk_logprobs - ex.topk_logprobs).max() <= 1 / 64 + 1 / 4096 + 1e-6
    m = merge_caches(tmp_path / "m1", [tmp_path / "v1a", tmp_path / "v1b"])
    assert m["format_version"] == 1 and verify_cache(tmp_path / "m1")["examples"] == 12
    with pytest.raises(IncompatibleCachesError, match="format version 2 vs 1; merge caches of one format version"):
        merge_caches(tmp_path / "m12", [tmp_path / "v1a", tmp_path / "v2"])
    assert not (tmp_path / "m12").exists()


def test_merge_refusals(tmp_path, rng):
    exs = [make_example(rng, i) for i in range(6)]
    write_cache(tmp_path / "a", exs[:3])
    write_cache(tmp_path / "overlap", exs[2:])
    other_tok = {**PROVENANCE, "tokenizer": {**PROVENANCE["tokenizer"], "fingerprint": "zzz"}}
    write_cache(tmp_path / "tok", exs[3:], provenance=other_tok)
    other_teacher = {**PROVENANCE, "teacher": {**PROVENANCE["teacher"], "name_or_path": "other"}}
    write_cache(tmp_path / "teacher", exs[3:], provenance=other_teacher)
    write_cache(tmp_path / "k4", exs[3:], k=4)
    for name, what in [("tok", "tokenizer.fingerprint"), ("teacher", "teacher.name_or_path"), ("k4", "codec")]:
        with pytest.raises(IncompatibleCachesError, match=what):
            merge_caches(tmp_path / f"m-{name}", [tmp_path / "a", tmp_path / name])
        assert not (tmp_path / f"m-{name}").exists()
    with pytest.raises(IncompatibleCachesError, match="'ex2' is in both"):
        merge_caches(tmp_path / "m-overlap", [tmp_path / "a", tmp_path / "overlap"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        merge_caches(tmp_path / "full", [tmp_path / "a"])
    r = kdcache("merge", tmp_path / "m-cli", tmp_path / "a", tmp_path / "tok")
    assert r.returncode == 1 and "tokenizer.fingerprint differs" in r.stderr


@pytest.mark.multiprocess
def test_inspect_shows_summary_and_example(cache):
    r = kdcache("inspect", cache, "--example", "ex3", "--top", "3")
    assert r.returncode == 0, r.stderr
    assert "examples" in r.stdout and "unit-teacher" in r.stdout and "id ex3" in r.stdout
    r = kdcache("inspect", cache, "--example", "nope")
    assert r.returncode == 1 and "no example with id 'nope'" in r.stderr


# ---- issue 9: verify checks what the trainer relies on ---------------------------------------


def _long_row(cache):
    """(shard index 0, row index) of a row of shard 0 with at least 2 trained positions."""
    import pyarrow.parquet as pq

    shard = load_manifest(cache)["shards"][0]["file"]
    n = pq.read_table(cache / shard, columns=["num_targets"]).column("num_targets").to_pylist()
    return next(i for i, v in enumerate(n) if v >= 2)


def _set_spans(cache, make_spans):
    """Replace one row's target spans by make_spans(start, end, L) (same number of positions)."""
    row = _long_row(cache)

    def edit(table):
        starts, ends = table.column("target_starts").to_pylist(), table.column("target_ends").to_pylist()
        L = len(table.column("input_ids")[row].as_py())
        (s,), (e,) = starts[row], ends[row]  # make_example writes one span per row
        starts[row], ends[row] = map(list, zip(*make_spans(s, e, L)))
        return replace_column(replace_column(table, "target_starts", starts), "target_ends", ends)

    rewrite_shard(cache, 0, edit)
    return row


BAD_SPANS = {
    "at_position_zero": (lambda s, e, L: [(0, e - s)], "start"),
    "past_sequence_end": (lambda s, e, L: [(s + 1, e + 1)], "sequence"),
    "overlapping": (lambda s, e, L: [(s, e - 1), (e - 2, e - 1)], "overlap|order"),
    "unsorted": (lambda s, e, L: [(s + 1, e), (s, s + 1)], "overlap|order"),
    "empty": (lambda s, e, L: [(s, e), (e, e)], "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPANS))
def test_verify_refuses_bad_target_spans(cache, case):
    make_spans, what = BAD_SPANS[case]
    row = _set_spans(cache, make_spans)
    shard = load_manifest(cache)["shards"][0]["file"]
    with pytest.raises(FormatError, match=rf"{shard}.*row {row}\b.*({what})"):
        verify_cache(cache)


def test_verify_refuses_span_at_position_zero(cache):
    _set_spans(cache, BAD_SPANS["at_position_zero"][0])
    with pytest.raises(FormatError, match="start"):
        verify_cache(cache)


def test_reader_refuses_bad_target_spans(cache):
    """Defence in depth: decode_table checks the spans, so an unverified (e.g. hf://) cache is refused too."""
    _set_spans(cache, BAD_SPANS["past_sequence_end"][0])
    with pytest.raises(FormatError, match="sequence"):
        list(CacheReader(cache, prefetch=0))


# ---- issue 9: duplicates ---------------------------------------------------------------------


def test_verify_refuses_a_shard_listed_twice(cache):
    def twice(m):
        m["shards"].append(dict(m["shards"][0]))
        m["counts"]["examples"] += m["shards"][0]["rows"]
        m["counts"]["positions"] += m["shards"][0]["positions"]

    edit_manifest(cache, twice)
    with pytest.raises(FormatError, match="listed twice"):
        verify_cache(cache)
    with pytest.raises(FormatError, match="listed twice"):
        CacheReader(cache)


def test_verify_refuses_a_copied_shard(cache):
    first = load_manifest(cache)["shards"][0]
    (cache / "copy.parquet").write_bytes((cache / first["file"]).read_bytes())

    def add_copy(m):
        m["shards"].append(dict(first, file="copy.parquet"))
        m["counts"]["examples"] += first["rows"]
        m["counts"]["positions"] += first["positions"]

    edit_manifest(cache, add_copy)
    with pytest.raises(FormatError, match="copy.parquet.*same sha256|same sha256.*copy.parquet"):
        verify_cache(cache)


def test_verify_refuses_duplicate_example_ids(cache):
    shards = load_manifest(cache)["shards"]
    import pyarrow.parquet as pq

    taken = pq.read_table(cache / shards[0]["file"], columns=["id"]).column("id")[0].as_py()
    rewrite_shard(cache, 1, lambda t: replace_column(t, "id", [taken] + t.column("id").to_pylist()[1:]))
    with pytest.raises(FormatError, match=rf"{taken!r}.*{shards[0]['file']}|{shards[1]['file']}.*{taken!r}"):
        verify_cache(cache)


def test_merge_refuses_a_shard_listed_twice(tmp_path, rng):
    exs = [make_example(rng, i) for i in range(10)]
    write_cache(tmp_path / "a", exs[:5])
    write_cache(tmp_path / "b", exs[5:])
    edit_manifest(tmp_path / "b", lambda m: m["shards"].append(dict(m["shards"][0])))
    with pytest.raises(FormatError, match="listed twice"):
        merge_caches(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    assert not (tmp_path / "m").exists()


def test_merge_refuses_the_same_cache_twice(tmp_path, rng):
    write_cache(tmp_path / "a", [make_example(rng, i) for i in range(5)])
    with pytest.raises(IncompatibleCachesError, match="twice|both"):
        merge_caches(tmp_path / "m", [tmp_path / "a", tmp_path / "a"])


# ---- issue 9: paths and values a manifest can hold -----------------------------------------


def test_verify_refuses_rejects_file_outside_the_cache(cache):
    from formats.manifest import sha256_file

    secret = cache.parent / "secret.jsonl"
    secret.write_text('{"id": "s", "reason": "secret"}\n')
    edit_manifest(cache, lambda m: m["rejects_file"].update(file="../secret.jsonl", sha256=sha256_file(secret)))
    with pytest.raises(FormatError, match="rejects_file.file.*outside"):
        verify_cache(cache)


def test_merge_does_not_copy_a_file_from_outside_the_cache(tmp_path, rng):
    from formats.manifest import sha256_file

    write_cache(tmp_path / "a", [make_example(rng, i) for i in range(5)])
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"id": "s", "reason": "the secret"}\n')
    edit_manifest(
        tmp_path / "a", lambda m: m["rejects_file"].update(file="../secret.jsonl", sha256=sha256_file(secret))
    )
    with pytest.raises(FormatError, match="rejects_file.file"):
        merge_caches(tmp_path / "m", [tmp_path / "a"])
    assert (
        not (tmp_path / "m" / "rejects.jsonl").exists()
        or "secret" not in (tmp_path / "m" / "rejects.jsonl").read_text()
    )


def test_merge_refuses_a_tampered_rejects_file(tmp_path, rng):
    write_cache(tmp_path / "a", [make_example(rng, i) for i in range(5)], rejects=[("r1", "no assistant turn")])
    with open(tmp_path / "a" / "rejects.jsonl", "a") as f:
        f.write('{"id": "forged", "reason": "x"}\n')
    with pytest.raises(ChecksumError, match="rejects.jsonl"):
        merge_caches(tmp_path / "m", [tmp_path / "a"])


def _set(path, value):
    def edit(m):
        d = m
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value

    return edit


HOSTILE_MANIFESTS = {
    "shards_not_a_list": (_set(("shards",), "part-00000.parquet"), "shards"),
    "shard_not_an_object": (_set(("shards", 0), "part-00000.parquet"), r"shards\[0\]"),
    "shard_file_not_a_string": (_set(("shards", 0, "file"), 7), r"shards\[0\].file"),
    "shard_rows_a_string": (_set(("shards", 0, "rows"), "12"), r"shards\[0\].rows"),
    "shard_rows_negative": (_set(("shards", 0, "rows"), -1), r"shards\[0\].rows"),
    "shard_bytes_missing": (lambda m: m["shards"][0].pop("bytes"), r"shards\[0\].bytes"),
    "shard_sha256_not_hex": (_set(("shards", 0, "sha256"), "zz"), r"shards\[0\].sha256"),
    "counts_not_an_object": (_set(("counts",), [1]), "counts"),
    "counts_examples_huge_float": (_set(("counts", "examples"), 1e300), "counts.examples"),
    "codec_k_huge": (_set(("codec", "k"), 10**12), "codec"),
    "codec_k_a_string": (_set(("codec", "k"), "64"), "codec"),
    "codec_not_an_object": (_set(("codec",), "kdcache-topk-v1"), "codec"),
    "k_disagrees_with_codec": (_set(("k",), 4), r"\bk\b"),
    "vocab_size_a_string": (_set(("tokenizer", "vocab_size"), "1000"), "tokenizer.vocab_size"),
    "vocab_size_huge": (_set(("tokenizer", "vocab_size"), 10**15), "tokenizer.vocab_size"),
    "output_size_zero": (lambda m: m["teacher"].update(output_size=0), "teacher.output_size"),
    "teacher_not_an_object": (_set(("teacher",), "x"), "teacher"),
    "rejects_file_not_an_object": (_set(("rejects_file",), "rejects.jsonl"), "rejects_file"),
    "rejects_file_absolute": (lambda m: m["rejects_file"].update(file="/etc/passwd"), "rejects_file.file"),
    "shard_file_a_url": (_set(("shards", 0, "file"), "s3://bucket/x.parquet"), r"shards\[0\].file"),
    "manifest_a_list": (lambda m: None, None),  # handled below
}


@pytest.mark.parametrize("case", sorted(k for k in HOSTILE_MANIFESTS if k != "manifest_a_list"))
def test_hostile_manifest_values_are_format_errors(cache, case):
    edit, field = HOSTILE_MANIFESTS[case]
    edit_manifest(cache, edit)
    with pytest.raises(FormatError, match=field):
        verify_cache(cache)
    r = kdcache("verify", cache)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr


def test_a_manifest_that_is_not_an_object_is_a_format_error(cache):
    (cache / "manifest.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="manifest.json.*object"):
        load_manifest(cache)


HOSTILE_SHARD_METADATA = {
    "id_bytes_huge": (lambda meta: {**meta, "id_bytes": 10**9}, "id_bytes"),
    "id_bytes_a_string": (lambda meta: {**meta, "id_bytes": "2"}, "id_bytes"),
    "hot_table_not_base64": (lambda meta: {**meta, "hot_table": "!!!"}, "hot_table"),
    "hot_table_odd_length": (lambda meta: {**meta, "hot_table": "AAA="}, "hot_table"),
    "codec_differs_from_manifest": (lambda meta: {**meta, "codec": {**meta["codec"], "k": 4}}, "codec"),
    "codec_k_huge": (lambda meta: {**meta, "codec": {**meta["codec"], "k": 10**12}}, "codec"),
    "not_json": (lambda meta: b"{not json", "kdcache"),
    "not_an_object": (lambda meta: [1], "kdcache"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SHARD_METADATA))
def test_hostile_shard_metadata_is_a_format_error(cache, case):
    edit, field = HOSTILE_SHARD_METADATA[case]
    rewrite_shard(cache, 0, edit_metadata=edit)
    shard = load_manifest(cache)["shards"][0]["file"]
    with pytest.raises(FormatError, match=rf"{shard}.*{field}"):
        verify_cache(cache)


def test_verify_checks_ids_against_the_teachers_output_size(tmp_path, rng):
    exs = [make_example(rng, i) for i in range(6)]
    write_cache(
        tmp_path / "c", exs, provenance={**PROVENANCE, "teacher": {**PROVENANCE["teacher"], "output_size": 1000}}
    )
    top = max(int(e.topk_ids.max()) for e in exs)
    edit_manifest(tmp_path / "c", lambda m: m["teacher"].update(output_size=top))
    with pytest.raises(FormatError, match=rf"token id {top} >= .*output size {top}"):
        verify_cache(tmp_path / "c")


def test_verify_refuses_rejects_that_do_not_add_up(cache):
    from formats.manifest import sha256_file

    with open(cache / "rejects.jsonl", "a") as f:
        f.write('{"id": "ex0", "reason": "no assistant turn", "source": ""}\n')  # an example id, also rejected
    edit_manifest(cache, lambda m: m["rejects_file"].update(sha256=sha256_file(cache / "rejects.jsonl")))
    with pytest.raises(FormatError, match="rejects"):
        verify_cache(cache)


# ---- issue 9: merge compares everything that changes rows, keeps every worker's provenance ----


def _worker(index, **filters):
    dataset = {
        **PROVENANCE["dataset"],
        "filters": {
            "num_workers": 2,
            "worker_index": index,
            "max_length": 4096,
            "length_policy": "truncate",
            "fraction": 1.0,
            **filters,
        },
    }
    return {**PROVENANCE, "dataset": dataset, "template": {"max_length": 4096, "length_policy": "truncate"}}


@pytest.mark.parametrize(
    "change", [{"max_length": 512}, {"length_policy": "drop"}, {"fraction": 0.5}, {"num_workers": 3}, {"seed": 7}]
)
def test_merge_refuses_different_dataset_filters(tmp_path, rng, change):
    exs = [make_example(rng, i) for i in range(8)]
    write_cache(tmp_path / "a", exs[:4], provenance=_worker(0))
    write_cache(tmp_path / "b", exs[4:], provenance=_worker(1, **change))
    key = next(iter(change))
    with pytest.raises(IncompatibleCachesError, match=rf"dataset.filters.{key}"):
        merge_caches(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])


def test_merge_refuses_different_template_settings(tmp_path, rng):
    exs = [make_example(rng, i) for i in range(8)]
    write_cache(tmp_path / "a", exs[:4], provenance=_worker(0))
    write_cache(tmp_path / "b", exs[4:], provenance={**_worker(1), "template": {"max_length": 512}})
    with pytest.raises(IncompatibleCachesError, match="extra.template"):
        merge_caches(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])


def test_merge_records_every_workers_provenance(tmp_path, rng):
    exs = [make_example(rng, i) for i in range(8)]
    write_cache(tmp_path / "a", exs[:4], provenance=_worker(0))
    write_cache(tmp_path / "b", exs[4:], provenance=_worker(1))
    m = merge_caches(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    verify_cache(tmp_path / "m")
    assert [w["dataset"]["filters"]["worker_index"] for w in m["merged_from"]] == [0, 1]
    assert all("teacher" in w and "extra" in w and "command" in w for w in m["merged_from"])
    assert m["dataset"]["filters"]["worker_index"] == [0, 1]


def _retype(column, arrow_type, convert):
    """edit_table for rewrite_shard: `column` rewritten with another Arrow type."""
    import pyarrow as pa

    def edit(table):
        i = table.schema.get_field_index(column)
        values = [convert(v) for v in table.column(column).to_pylist()]
        return table.set_column(i, pa.field(column, arrow_type), pa.array(values, type=arrow_type))

    return edit


@pytest.mark.parametrize(
    "column,arrow_type,convert",
    [
        ("id", "int64", lambda v: abs(hash(v)) % 1000),
        ("meta", "int64", lambda v: 7),
        ("num_targets", "string", str),
        ("input_ids", "list<item: double>", lambda v: [float(x) for x in v]),
        ("topk_count", "large_binary", lambda v: v),
    ],
    ids=["id-int", "meta-int", "num_targets-string", "input_ids-float", "stream-large_binary"],
)
def test_a_column_of_another_type_is_refused_by_verify_and_reader(cache, column, arrow_type, convert):
    """Checksums updated: only the schema check can catch it; nothing is coerced or misread."""
    import pyarrow as pa

    types = {
        "int64": pa.int64(),
        "string": pa.string(),
        "list<item: double>": pa.list_(pa.float64()),
        "large_binary": pa.large_binary(),
    }
    rewrite_shard(cache, 0, edit_table=_retype(column, types[arrow_type], convert))
    for check in (verify_cache, lambda c: list(CacheReader(c))):
        with pytest.raises(FormatError, match=f"column types differ.*{column} is"):
            check(cache)


def test_an_empty_example_id_is_refused_by_verify_and_reader(cache):
    rewrite_shard(cache, 0, edit_table=lambda t: replace_column(t, "id", [""] + t.column("id").to_pylist()[1:]))
    for check in (verify_cache, lambda c: list(CacheReader(c))):
        with pytest.raises(FormatError, match="empty example id"):
            check(cache)


def test_merge_of_verifiable_caches_never_crashes_on_odd_sections(tmp_path, rng):
    """A section of another shape in both inputs (each verifies): a typed answer, not AttributeError."""
    exs = [make_example(rng, i) for i in range(10)]
    for name, part in (("a", exs[:5]), ("b", exs[5:])):
        write_cache(tmp_path / name, part)
        edit_manifest(tmp_path / name, lambda m: m["dataset"].update(filters="x"))
        verify_cache(tmp_path / name)
    try:
        merge_caches(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    except (FormatError, IncompatibleCachesError):
        return
    verify_cache(tmp_path / "m")


def test_merge_counts_reasons_from_the_rejects_themselves(tmp_path, rng):
    """An input without counts.rejects_by_reason (optional; it verifies): the merged cache still verifies."""
    exs = [make_example(rng, i) for i in range(10)]
    write_cache(tmp_path / "a", exs[:5], rejects=[("r1", "too long: 9000 > 4096")])
    write_cache(tmp_path / "b", exs[5:], rejects=[("r2", "no assistant turn")])
    edit_manifest(tmp_path / "a", lambda m: m["counts"].pop("rejects_by_reason"))
    verify_cache(tmp_path / "a")
    merged = merge_caches(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    assert merged["counts"]["rejects_by_reason"] == {"too long": 1, "no assistant turn": 1}
    verify_cache(tmp_path / "m")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda meta: meta["codec"].update(k=meta["codec"]["k"] * 2), "codec"),
    ],
    ids=["shard-k-larger-than-manifest"],
)
def test_reader_checks_each_shard_header_against_the_manifest(cache, edit, match):
    """An unverified (hf://) cache: a shard whose codec differs from the manifest is refused by the reader too."""

    def edit_metadata(meta):
        edit(meta)
        return meta

    rewrite_shard(cache, 0, edit_metadata=edit_metadata)
    with pytest.raises(FormatError, match=match):
        list(CacheReader(cache))


def test_reader_checks_each_shards_rows_against_the_manifest(cache):
    def one_more_row(m):  # counts kept consistent: only the shard's own row count can catch it
        m["shards"][0]["rows"] += 1
        m["counts"]["examples"] += 1

    edit_manifest(cache, one_more_row)
    with pytest.raises(FormatError, match="rows, the manifest says"):
        list(CacheReader(cache))
    edit_manifest(cache, lambda m: m["shards"][0].update(rows=m["shards"][0]["rows"] - 1))
    with pytest.raises(FormatError, match="counts.examples says"):
        CacheReader(cache)
