"""formats/example.py: the Example dataclass's derived values (num_targets, tail_mass, labels) and
IGNORE_INDEX, on hand-made examples and on examples read back from a real cache."""

from __future__ import annotations

import numpy as np
import pytest

from formats import CacheReader
from formats.example import IGNORE_INDEX, Example


def example(positions=(1, 3), lps=((np.log(0.5), np.log(0.25)), (np.log(0.1), -np.inf)), length=5) -> Example:
    n = len(positions)
    return Example(
        id="e",
        input_ids=np.arange(100, 100 + length, dtype=np.int32),
        target_positions=np.asarray(positions, np.int32),
        topk_ids=np.zeros((n, 2), np.int32),
        topk_logprobs=np.asarray(lps, np.float32).reshape(n, 2),
        target_logprobs=np.zeros(n, np.float32),
        target_ranks=np.ones(n, np.int32),
    )


def test_ignore_index_is_hugging_faces():
    assert IGNORE_INDEX == -100


def test_num_targets_is_a_python_int():
    ex = example()
    assert ex.num_targets == 2 and type(ex.num_targets) is int
    assert example(positions=(), lps=np.zeros((0, 2))).num_targets == 0


def test_tail_mass_is_what_the_stored_entries_leave():
    tail = example().tail_mass
    assert tail.dtype == np.float32 and tail.shape == (2,)
    np.testing.assert_allclose(tail, [0.25, 0.9], rtol=1e-6)  # the -inf padding entry holds no mass


def test_tail_mass_is_clipped_to_0_when_quantization_lifts_the_mass_above_1():
    tail = example(positions=(1,), lps=((-0.01, -0.01),)).tail_mass  # exp(-0.01) * 2 ~ 1.98
    assert tail.tolist() == [0.0]


def test_tail_mass_of_negligible_entries_is_1_without_an_underflow_error():
    with np.errstate(all="raise"):  # the property silences exp's underflow itself
        tail = example(positions=(1,), lps=((-800.0, -900.0),)).tail_mass
    assert tail.tolist() == [1.0]


def test_tail_mass_of_no_positions_is_empty():
    assert example(positions=(), lps=np.zeros((0, 2))).tail_mass.shape == (0,)


def test_labels_are_the_trained_tokens_and_ignore_index_elsewhere():
    labels = example().labels
    assert labels.dtype == np.int64
    assert labels.tolist() == [IGNORE_INDEX, 101, IGNORE_INDEX, 103, IGNORE_INDEX]


def test_labels_of_an_example_with_nothing_trained_are_all_ignored():
    labels = example(positions=(), lps=np.zeros((0, 2))).labels
    assert labels.tolist() == [IGNORE_INDEX] * 5


def test_each_example_gets_its_own_meta_and_the_documented_defaults():
    a, b = example(), example()
    a.meta["sample"] = 1
    assert b.meta == {} and a.source == "" and a.finish_reason is None


@pytest.mark.parametrize("i", [0, 7])
def test_read_back_examples_have_consistent_derived_values(cache, examples, i):
    got = {e.id: e for e in CacheReader(cache, prefetch=0)}[examples[i].id]
    assert got.num_targets == examples[i].num_targets == len(got.topk_ids)
    trained = got.labels != IGNORE_INDEX
    assert np.flatnonzero(trained).tolist() == got.target_positions.tolist()
    np.testing.assert_array_equal(got.labels[trained], examples[i].input_ids[examples[i].target_positions])
    assert ((got.tail_mass >= 0) & (got.tail_mass <= 1)).all()
    np.testing.assert_allclose(
        got.tail_mass, examples[i].tail_mass, atol=0.02
    )  # entries within 0.016 nat: mass within ~1.6%
