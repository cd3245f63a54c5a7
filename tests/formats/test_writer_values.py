"""issue 9, items 10 and 11: the writer's id width and range come from the teacher's output size, and
logprobs are finite or -inf (NaN is refused naming example and position; -inf round-trips)."""

import numpy as np
import pytest
from .format_helpers import PROVENANCE, assert_same_topk, make_example, write_cache

from formats import CacheReader, CacheWriter, CodecConfig
from formats.errors import InputError
from formats.tools import verify_cache


# ---- issue 9, item 10: id width and range come from the teacher's output size -----------------

NO_SIZES = {**PROVENANCE, "tokenizer": {k: v for k, v in PROVENANCE["tokenizer"].items() if k != "vocab_size"}}


def test_writer_id_width_does_not_depend_on_the_first_row_group(tmp_path, rng):
    small = [make_example(rng, i, vocab=1000) for i in range(6)]
    big = make_example(rng, 99, vocab=1000)
    big.topk_ids = big.topk_ids + 69_000  # a later row group with ids past 2-byte codes
    with CacheWriter(tmp_path / "c", codec=CodecConfig(k=8), provenance=NO_SIZES, row_group_positions=32) as w:
        for ex in small + [big]:
            w.write(ex)
    got = {ex.id: ex for ex in CacheReader(tmp_path / "c")}
    assert_same_topk(got["ex99"].topk_ids, got["ex99"].topk_logprobs, big.topk_ids)
    verify_cache(tmp_path / "c")


def test_writer_refuses_an_id_past_the_output_size_with_a_clear_error(tmp_path, rng):
    ex = make_example(rng, 0, min_targets=2)
    ex.topk_ids = ex.topk_ids.copy()
    ex.topk_ids[1, 0] = 1000  # PROVENANCE: vocab_size 1000
    with CacheWriter(tmp_path / "c", codec=CodecConfig(k=8), provenance=PROVENANCE) as w:
        with pytest.raises(
            InputError, match=rf"'ex0', position {int(ex.target_positions[1])}: token id 1000 >= .*1000.*output_size"
        ):
            w.write(ex)


def test_writer_takes_padding_ids_of_a_padded_output_layer(tmp_path, rng):
    ex = make_example(rng, 0)
    ex.topk_ids = ex.topk_ids.copy()
    ex.topk_ids[0, -1] = 1010  # a padding row of a 1024-row LM head (tokenizer: 1000 tokens)
    m = write_cache(tmp_path / "c", [ex], output_size=1024)
    assert m["teacher"]["output_size"] == 1024 and m["tokenizer"]["vocab_size"] == 1000
    verify_cache(tmp_path / "c")
    assert next(iter(CacheReader(tmp_path / "c"))).topk_ids[0, -1] == 1010


# ---- issue 9, item 11: NaN is an error, -inf round-trips ---------------------------------------


@pytest.mark.parametrize("field", ["topk_logprobs", "target_logprobs"])
def test_writer_refuses_a_nan_logprob_naming_example_and_position(tmp_path, rng, field):
    ex = make_example(rng, 0, min_len=10, min_targets=3)
    values = getattr(ex, field).copy()
    values[2, ...] = np.nan if values.ndim == 1 else values[2]
    if values.ndim == 2:
        values[2, 3] = np.nan
    setattr(ex, field, values)
    with CacheWriter(tmp_path / "c", codec=CodecConfig(k=8), provenance=PROVENANCE) as w:
        with pytest.raises(InputError, match=rf"'ex0', position {int(ex.target_positions[2])} .*{field}.*nan"):
            w.write(ex)


def test_neg_inf_logprobs_round_trip_through_a_cache(tmp_path, rng):
    ex = make_example(rng, 0, min_len=10, min_targets=3)
    ex.topk_logprobs = ex.topk_logprobs.copy()
    ex.topk_logprobs[0, 5:] = -np.inf  # probability 0: stored as padding (id -1, -inf)
    ex.topk_logprobs[1, 6:] = ex.topk_logprobs[1, 0] - 3000.0  # below the step range: the escape q = 65535
    write_cache(tmp_path / "c", [ex])
    got = next(iter(CacheReader(tmp_path / "c")))
    assert np.isneginf(got.topk_logprobs[0, 5:]).all() and (got.topk_ids[0, 5:] == -1).all()
    assert np.isneginf(got.topk_logprobs[1, 6:]).all()
    assert_same_topk(got.topk_ids[1], got.topk_logprobs[1], ex.topk_ids[1])  # the -inf entries are one tie
    verify_cache(tmp_path / "c")
