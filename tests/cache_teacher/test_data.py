"""cache_teacher.data: validation reasons, selection, local formats."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cache_teacher.data import iter_records, validate
from formats.errors import InputError

from .teacher_helpers import make_config, write_jsonl

GOOD = {"id": "good", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD = [
    ({"id": "b1"}, "missing_messages"),
    ({"id": "b2", "messages": "hi"}, "messages_not_list"),
    ({"id": "b3", "messages": []}, "empty_messages"),
    ({"id": "b4", "messages": ["hi"]}, "message_not_dict"),
    (
        {"id": "b5", "messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "unknown_role",
    ),
    (
        {"id": "b6", "messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
        "non_string_content",
    ),
    ({"id": "b7", "messages": [{"role": "user", "content": "x"}]}, "no_assistant_turn"),
    (
        {"id": "b8", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
        "empty_assistant_content",
    ),
    (
        {"id": "b9", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]},
        "non_string_content",
    ),
    (["not", "a", "dict"], "not_a_dict"),
]


@pytest.mark.parametrize("record,code", BAD, ids=[code for _, code in BAD])
def test_validate_gives_specific_reasons(record, code):
    reason = validate(record)
    assert reason is not None and reason.split(":")[0] == code, reason


def test_every_input_is_yielded_once_good_or_rejected(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [GOOD] + [r for r, _ in BAD] + [dict(GOOD)]  # the last one repeats an id
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    out = list(iter_records(make_config(dataset=str(path), teacher="t", out="o")))
    assert len(out) == len(rows) + 1
    good = [r for r, _ in out if r is not None]
    rejects = {rid: reason.split(":")[0] for _, (rid, reason, _) in (x for x in out if x[1] is not None)}
    assert [g["id"] for g in good] == ["good"]
    assert {rejects[f"b{i}"] for i in range(1, 10)} == {code for _, code in BAD[:-1]}
    assert rejects["row-000000010"] == "not_a_dict"
    assert sorted(rejects.values()).count("duplicate_id") == 1
    assert sorted(rejects.values()).count("invalid_json") == 1


def test_workers_partition_disjointly_and_fraction_is_stable(sample_rows, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", sample_rows)

    def ids(**kw):
        return [r["id"] for r, _ in iter_records(make_config(dataset=str(path), teacher="t", out="o", **kw))]

    everything = ids()
    assert len(everything) == 100
    parts = [ids(num_workers=3, worker_index=i) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(everything) and all(parts)
    assert not set(parts[0]) & set(parts[1])
    half = ids(fraction=0.5, seed=1)
    assert 30 < len(half) < 70 and half == ids(fraction=0.5, seed=1) and half != ids(fraction=0.5, seed=2)
    assert set(ids(fraction=0.25, seed=1)) <= set(half)  # nested sweeps: a smaller fraction is a subset
    assert ids(max_examples=7) == everything[:7]
    assert sorted(sum((ids(max_examples=7, num_workers=2, worker_index=i) for i in range(2)), [])) == sorted(
        everything[:7]
    )
    assert ids(sources=["nope"]) == [] and len(ids(sources=["ai2-adapt-dev/oasst1_converted"])) == 100


def test_local_formats_json_parquet_folder(sample_rows, tmp_path):
    rows = sample_rows[:6]
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", rows[:2])
    (tmp_path / "d" / "b.json").write_text(json.dumps(rows[2:4]))
    pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "d" / "c.parquet")
    got = [r["id"] for r, _ in iter_records(make_config(dataset=str(tmp_path / "d"), teacher="t", out="o"))]
    assert got == [r["id"] for r in rows]
    with pytest.raises(InputError):
        list(iter_records(make_config(dataset=str(tmp_path / "missing.jsonl"), teacher="t", out="o")))
