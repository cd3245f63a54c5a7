"""A received cache is untrusted (issue 19): the mutation fuzzer. Over real caches (several shards and
row groups, rejects, a mass-adaptive generate-mode cache, one with tokenizer files), one random
mutation per case, then verify (with and without value checks), a full read, merge (and reading its
output), summarize and load_cache_tokenizer on the mutated copy. Each must raise a typed error
naming the offending file or the cache, or return exactly the original data, within the time and
memory bounds (tests/formats/cache_mutations.py has the operators, the oracle and the workers).

`make test` runs every named regression case (one per mutation kind and variant, each its own test)
and FUZZ_CASES random cases (default 200) of FUZZ_SEED (default 0), listing every failing case with
its reproduction. `make fuzz` runs 10,000 (FUZZ_CASES=N or N:START, FUZZ_SEED=S or random).
Replay one case: FUZZ_CASE=SEED:INDEX (comma-separated, or a regression name) pytest -k random ...,
or in-process with tracebacks: python -m tests.formats.cache_mutations SEED:INDEX [--op OP].
FUZZ_TIMEOUT (s per operation, default 20), FUZZ_MEM_MB (default 1536), FUZZ_WORKERS (default 2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from . import cache_mutations as cm

pytestmark = pytest.mark.multiprocess  # worker subprocesses (test-fast leaves it out)

DEFAULT_CASES = 200


def _random_cases() -> list[dict]:
    if os.environ.get("FUZZ_CASE"):
        return [cm.parse_case(c.strip()) for c in os.environ["FUZZ_CASE"].split(",") if c.strip()]
    spec = os.environ.get("FUZZ_CASES", str(DEFAULT_CASES))
    count, _, start = spec.partition(":")
    seed = os.environ.get("FUZZ_SEED", "0")
    seed = int.from_bytes(os.urandom(4), "little") if seed == "random" else int(seed)
    print(f"FUZZ_SEED={seed} FUZZ_CASES={count}:{start or 0}")
    return [{"seed": seed, "index": i} for i in range(int(start or 0), int(start or 0) + int(count))]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    return cm.build_caches(tmp_path_factory.mktemp("fuzz-bases"))


@pytest.fixture(scope="module")
def pool(bases):
    with cm.Pool(bases, workers=int(os.environ.get("FUZZ_WORKERS", min(2, os.cpu_count() or 1)))) as p:
        yield p


def test_the_base_caches_are_what_the_fuzzer_needs(bases):
    """Harness sanity: several shards and row groups, rejects, mass-adaptive codec, generate mode,
    tokenizer files; and each base passes verify."""
    import pyarrow.parquet as pq

    from formats.tools import verify_cache

    for name in cm.BASES:
        m = json.loads((Path(bases[name]) / "manifest.json").read_text())
        assert verify_cache(bases[name])["examples"] == m["counts"]["examples"]
        assert m["counts"]["rejects"] >= 1 and m["counts"].get("inputs")
        if name != "tok":
            assert len(m["shards"]) >= 3
            assert any(pq.ParquetFile(Path(bases[name]) / s["file"]).num_row_groups >= 2 for s in m["shards"])
    gen = json.loads((Path(bases["gen"]) / "manifest.json").read_text())
    assert gen["codec"]["mass"] == 0.9 and gen["mode"] == "generate"
    assert json.loads((Path(bases["tok"]) / "manifest.json").read_text())["tokenizer_files"]


def test_the_harness_catches_a_hang_a_crash_a_memory_bomb_and_an_untyped_error(bases):
    with cm.Pool(bases, workers=1, timeout=3, light=True) as p:
        records = p.run([{"selftest": s} for s in ("hang", "crash", "memory", "untyped")])
    kinds = {cm.case_key(r["case"]): [x["kind"] for x in r["results"]] for r in records}
    assert kinds == {
        "selftest-hang": ["hang"],
        "selftest-crash": ["crash"],
        "selftest-memory": ["memory (MemoryError)"],
        "selftest-untyped": ["untyped"],
    }, kinds


@pytest.fixture(scope="module")
def regression_records(pool) -> dict:
    return {cm.case_key(r["case"]): r for r in pool.run([{"name": n} for n in cm.REGRESSION])}


@pytest.mark.parametrize("name", list(cm.REGRESSION))
def test_regression_case(name, regression_records, pool):
    assert not pool.harness_errors, pool.harness_errors
    rec = regression_records[name]
    assert rec["info"] and rec["results"], f"{name}: no result ({rec})"
    ran = {r["op"] for r in rec["results"]}
    assert set(rec["info"]["ops"]) <= ran or cm.failures([rec]), f"{name}: operations missing: {rec}"
    if cm.failures([rec]):
        pytest.fail(cm.report([rec], limit=10), pytrace=False)


# Random cases that once found a defect, replayed (SEED:INDEX; the base caches are deterministic, so each
# replays the same mutation while the writer's layout stays the same, and stays a valid case after).
FOUND = {
    "11:8830": "two byte flips in a shard's footer (checksum fixed up): pyarrow's per-column metadata accessor "
    "aborted the process in the expansion check",
    "11:9808": "a byte flip in the source column (checksum fixed up): text that is not UTF-8, an untyped error",
}


@pytest.mark.parametrize("case", list(FOUND))
def test_random_cases_that_found_a_defect(case, pool):
    records = pool.run([cm.parse_case(case)])
    assert not pool.harness_errors, pool.harness_errors
    if cm.failures(records):
        pytest.fail(f"{FOUND[case]}\n{cm.report(records, limit=10)}", pytrace=False)


def test_random_mutations(pool):
    records = pool.run(_random_cases())
    summary = cm.report(records, limit=20)
    print(summary)
    assert not pool.harness_errors, pool.harness_errors
    if cm.failures(records):
        pytest.fail(summary, pytrace=False)
