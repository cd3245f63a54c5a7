"""formats/batch.py: pad_batch, the padded batch for users of the reader (shapes, dtypes, padding values,
the teacher's rows flattened over the batch with where each belongs, examples of different widths and with
nothing trained, torch tensors), on hand-made examples and on examples read back from a real cache."""

from __future__ import annotations

import numpy as np
import pytest

from formats import CacheReader
from formats.batch import concat_rows, example_rows, pad_batch
from formats.example import IGNORE_INDEX, Example

from .format_helpers import make_example, write_cache


def example(id, length, positions, k) -> Example:
    """Token t is 10 + t; the teacher's entry j at row n is id 100 * (n + 1) + j, logprob -(j + 1)."""
    n = len(positions)
    return Example(
        id=id,
        input_ids=np.arange(10, 10 + length, dtype=np.int32),
        target_positions=np.asarray(positions, np.int32),
        topk_ids=(100 * np.arange(1, n + 1)[:, None] + np.arange(k)).astype(np.int32),
        topk_logprobs=np.tile(-1.0 - np.arange(k, dtype=np.float32), (n, 1)),
        target_logprobs=-0.5 * np.arange(1, n + 1, dtype=np.float32),
        target_ranks=np.arange(1, n + 1, dtype=np.int32),
    )


def three():
    return [example("a", 4, (1, 3), k=3), example("b", 6, (2,), k=2), example("c", 2, (1,), k=3)]


@pytest.fixture
def batch():
    return pad_batch(three())


def test_shapes_and_dtypes(batch):
    assert batch["ids"] == ["a", "b", "c"]
    assert batch["input_ids"].shape == (3, 6) and batch["input_ids"].dtype == np.int32
    assert batch["attention_mask"].dtype == bool and batch["labels"].dtype == np.int64
    assert batch["topk_ids"].shape == (4, 3) and batch["topk_ids"].dtype == np.int32
    assert batch["topk_logprobs"].dtype == np.float32
    assert batch["target_batch"].dtype == np.int64 and batch["target_position"].dtype == np.int64
    assert batch["target_logprobs"].dtype == np.float32 and batch["target_ranks"].dtype == np.int32


def test_tokens_are_zero_padded_and_masked(batch):
    assert batch["input_ids"].tolist() == [
        [10, 11, 12, 13, 0, 0],
        [10, 11, 12, 13, 14, 15],
        [10, 11, 0, 0, 0, 0],
    ]
    assert batch["attention_mask"].sum(1).tolist() == [4, 6, 2]
    assert not batch["attention_mask"][0, 4:].any()


def test_labels_hold_the_trained_tokens_only(batch):
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, 11, x, 13, x, x], [x, x, 12, x, x, x], [x, 11, x, x, x, x]]


def test_teacher_rows_are_flattened_in_example_order_with_where_each_belongs(batch):
    assert batch["target_batch"].tolist() == [0, 0, 1, 2]
    assert batch["target_position"].tolist() == [1, 3, 2, 1]
    assert batch["target_logprobs"].tolist() == [-0.5, -1.0, -0.5, -0.5]
    assert batch["target_ranks"].tolist() == [1, 2, 1, 1]
    rows = batch["target_batch"], batch["target_position"]
    assert (batch["labels"][rows] == batch["input_ids"][rows]).all()  # each row is a trained token's


def test_narrower_examples_are_padded_with_minus_one_and_minus_infinity(batch):
    assert batch["topk_ids"].tolist() == [[100, 101, 102], [200, 201, 202], [100, 101, -1], [100, 101, 102]]
    assert batch["topk_logprobs"][2].tolist() == [-1.0, -2.0, -np.inf]
    assert np.isfinite(batch["topk_logprobs"][[0, 1, 3]]).all()


# An example with no trained positions but K > 0 columns (topk_ids [0, K], what the reader decodes for a row
# with num_targets 0) was copied into a [0, 0] slice: ValueError 'could not broadcast' (fixed).


@pytest.mark.parametrize(
    "examples, width, rows",
    [
        ([example("a", 3, (1,), k=2), example("b", 3, (), k=8)], 2, 1),  # the width ignores the untrained one
        ([example("a", 3, (), k=4), example("b", 5, (), k=4)], 1, 0),
    ],
    ids=["one_untrained", "all_untrained"],
)
def test_examples_with_nothing_trained_add_no_teacher_rows_and_no_width(examples, width, rows):
    b = pad_batch(examples)
    assert b["topk_ids"].shape == (rows, width) and b["target_batch"].shape == (rows,)
    assert b["input_ids"].shape == (2, max(len(e.input_ids) for e in examples))
    assert (b["labels"][1] == IGNORE_INDEX).all()


def test_a_read_back_example_with_nothing_trained_can_be_batched(tmp_path, rng):
    write_cache(tmp_path / "c", [make_example(rng, 0), example("untrained", 5, (), k=8)])
    got = list(CacheReader(tmp_path / "c", prefetch=0))
    assert [e.num_targets for e in got][1] == 0 and got[1].topk_ids.shape == (0, 8)
    b = pad_batch(got)
    assert b["topk_ids"].shape == (got[0].num_targets, 8) and (b["target_batch"] == 0).all()


def test_an_empty_list_is_an_empty_batch():
    b = pad_batch([])
    assert b["ids"] == [] and b["input_ids"].shape == (0, 0) and b["topk_ids"].shape == (0, 1)


def test_as_torch_gives_tensors_of_the_same_values(batch):
    import torch

    t = pad_batch(three(), as_torch=True)
    assert t["ids"] == ["a", "b", "c"]
    for key, value in batch.items():
        if key != "ids":
            assert isinstance(t[key], torch.Tensor) and t[key].numpy().dtype == value.dtype
            np.testing.assert_array_equal(t[key].numpy(), value)


def test_a_batch_of_read_back_examples_holds_every_teacher_row(cache, examples):
    got = list(CacheReader(cache, prefetch=0))[:5]
    b = pad_batch(got)
    assert b["topk_ids"].shape == (sum(e.num_targets for e in got), 8)
    for i, ex in enumerate(got):
        rows = b["target_batch"] == i
        np.testing.assert_array_equal(b["target_position"][rows], ex.target_positions)
        np.testing.assert_array_equal(b["topk_ids"][rows], ex.topk_ids)
        np.testing.assert_array_equal(b["input_ids"][i, : len(ex.input_ids)], ex.input_ids)


# ---- example_rows / concat_rows: one example per token, Hugging Face's unshifted layout ----------------------
def test_example_rows_put_each_teacher_row_at_its_token():
    rows = example_rows(example("a", 5, (1, 3), k=3), k=4)
    assert rows.input_ids.tolist() == [10, 11, 12, 13, 14] and rows.input_ids.dtype == np.int64
    assert rows.labels.tolist() == [IGNORE_INDEX, 11, IGNORE_INDEX, 13, IGNORE_INDEX]
    assert rows.topk_ids.shape == (5, 4) and rows.topk_ids.dtype == np.int32
    assert rows.topk_ids[1].tolist() == [100, 101, 102, -1] and rows.topk_ids[3].tolist() == [200, 201, 202, -1]
    assert (rows.topk_ids[[0, 2, 4]] == -1).all() and np.isneginf(rows.topk_logprobs[[0, 2, 4]]).all()
    assert rows.topk_logprobs[1, :3].tolist() == [-1.0, -2.0, -3.0] and np.isneginf(rows.topk_logprobs[1, 3])
    assert not rows.truncated and rows.dropped == 0


def test_example_rows_keep_the_first_k_and_cut_at_max_tokens():
    rows = example_rows(example("a", 6, (1, 3, 5), k=4), k=2, max_tokens=4)
    assert len(rows) == 4 and rows.truncated and rows.dropped == 1
    assert rows.topk_ids[3].tolist() == [200, 201] and rows.labels.tolist() == [IGNORE_INDEX, 11, IGNORE_INDEX, 13]
    untrained = example_rows(example("b", 3, (), k=4), k=2)
    assert (untrained.labels == IGNORE_INDEX).all() and (untrained.topk_ids == -1).all()


def test_concat_rows_restarts_positions_and_widens_to_the_widest():
    seq = concat_rows([example_rows(example("a", 3, (1,), k=2), 2), example_rows(example("b", 2, (1,), k=3), 3)])
    assert seq["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert seq["input_ids"].tolist() == [10, 11, 12, 10, 11]
    assert seq["topk_ids"].shape == (5, 3) and seq["topk_ids"][1].tolist() == [100, 101, -1]
    assert seq["labels"].tolist() == [IGNORE_INDEX, 11, IGNORE_INDEX, IGNORE_INDEX, 11]
