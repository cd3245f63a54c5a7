"""formats/ids.py: the one sample-id scheme both stages use."""

from __future__ import annotations

from formats.ids import input_record_id, is_eval, record_id, sample_ids

# Computed with the code before issue 10 (train_student/data.py's own blake2b of the record id):
# the held-out split of every existing cache must not move.
HELD_OUT_10 = [7, 11, 18, 26, 40, 43, 62, 85, 87, 94, 96, 98, 100, 101, 117, 127, 131, 150, 156, 164, 169]
HELD_OUT_5_SAMPLES = [40, 43, 85, 96, 98, 100, 131, 150, 156]


def test_held_out_split_is_pinned():
    assert [i for i in range(200) if is_eval(f"row-{i:09d}", 0.1)] == HELD_OUT_10
    assert [i for i in range(200) if is_eval(f"row-{i:09d}#s1", 0.05)] == HELD_OUT_5_SAMPLES
    assert [i for i in ("row-000000000", "tulu-42", "tulu-42#s3", "abc", "ünï") if is_eval(i, 0.5)] == [
        "row-000000000",
        "tulu-42",
        "tulu-42#s3",
        "ünï",
    ]
    assert not is_eval("row-000000007", 0.0)


def test_sample_ids_round_trip_to_their_record():
    assert sample_ids("r1", 1) == ["r1"]
    assert sample_ids("r1", 3) == ["r1#s0", "r1#s1", "r1#s2"]
    assert {record_id(s) for s in sample_ids("r1", 3)} == {"r1"}


def test_input_record_id_falls_back_to_the_row_index():
    assert input_record_id({"id": "a"}, 5) == "a"
    assert input_record_id({"id": 7}, 5) == "7"
    for raw in ({"id": True}, {"id": " "}, {"id": None}, {}, ["not", "a", "dict"]):
        assert input_record_id(raw, 5) == "row-000000005"
