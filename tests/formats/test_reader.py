import itertools

import numpy as np
import pytest
from format_helpers import make_example, write_cache

from formats import CacheReader


def ids(reader):
    return [ex.id for ex in reader]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_partitions_cover_every_row_once(cache, examples, world, shuffle):
    parts = [ids(CacheReader(cache, rank=r, world_size=world, shuffle=shuffle, seed=7)) for r in range(world)]
    flat = list(itertools.chain(*parts))
    assert sorted(flat) == sorted(e.id for e in examples)
    assert len(flat) == len(set(flat))


def test_few_row_groups_are_split_by_rows(tmp_path, rng):
    exs = [make_example(rng, i) for i in range(7)]
    write_cache(tmp_path / "c", exs, row_group_positions=10**9, shard_max_bytes=10**9)  # one row group
    parts = [ids(CacheReader(tmp_path / "c", rank=r, world_size=3)) for r in range(3)]
    assert sorted(itertools.chain(*parts)) == sorted(e.id for e in exs)
    assert all(parts)


def test_shuffle_is_deterministic_and_seeded(cache):
    a = ids(CacheReader(cache, shuffle=True, seed=1))
    assert a == ids(CacheReader(cache, shuffle=True, seed=1))
    assert a != ids(CacheReader(cache, shuffle=True, seed=2))
    assert a != ids(CacheReader(cache))
    two = ids(CacheReader(cache, shuffle=True, seed=1, epochs=2))
    assert two[: len(a)] == a and sorted(two[len(a) :]) == sorted(a) and two[len(a) :] != a


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resumed_cursor_yields_exactly_the_rest(cache, prefetch):
    full = ids(CacheReader(cache, shuffle=True, seed=3, epochs=2, prefetch=prefetch))
    for cut in (0, 1, 7, len(full) // 2, len(full) - 1):
        r = CacheReader(cache, shuffle=True, seed=3, epochs=2, prefetch=prefetch)
        it = iter(r)
        head = [next(it).id for _ in range(cut)]
        state = r.state_dict()
        r2 = CacheReader(cache, shuffle=True, seed=3, epochs=2, prefetch=prefetch)
        r2.load_state_dict(state)
        assert head + ids(r2) == full


def test_cursor_from_other_settings_is_refused(cache):
    state = CacheReader(cache, shuffle=True, seed=3).state_dict()
    with pytest.raises(ValueError, match="seed"):
        CacheReader(cache, shuffle=True, seed=4).load_state_dict(state)


def test_decoded_examples_match_what_was_written(cache, examples):
    got = {ex.id: ex for ex in CacheReader(cache)}
    for ex in examples:
        g = got[ex.id]
        np.testing.assert_array_equal(g.input_ids, ex.input_ids)
        np.testing.assert_array_equal(g.target_positions, ex.target_positions)
        np.testing.assert_array_equal(g.topk_ids, ex.topk_ids)
        np.testing.assert_array_equal(g.target_ranks, ex.target_ranks)
        assert np.abs(g.topk_logprobs - ex.topk_logprobs).max() <= 1 / 64 + 1 / 4096 + 1e-6
        assert np.abs(g.target_logprobs - ex.target_logprobs).max() <= 1 / 512 + 1e-6
        np.testing.assert_allclose(g.tail_mass, ex.tail_mass, atol=0.02)
        assert g.labels[g.target_positions].tolist() == ex.input_ids[ex.target_positions].tolist()


def test_max_examples_takes_a_prefix(cache, examples):
    assert ids(CacheReader(cache, max_examples=5)) == [e.id for e in examples[:5]]
    assert CacheReader(cache, max_examples=5, world_size=2, rank=1).num_examples() <= 5


def test_loads_with_ordinary_tools(cache, examples):
    import pyarrow.dataset as ds

    # the folder also holds manifest.json, README.md and rejects.jsonl: skip what is not Parquet
    table = ds.dataset(str(cache), format="parquet", exclude_invalid_files=True).to_table(columns=["id", "input_ids", "num_targets"])
    assert sorted(table.column("id").to_pylist()) == sorted(e.id for e in examples)
    datasets = pytest.importorskip("datasets")
    d = datasets.load_dataset("parquet", data_files=str(cache / "*.parquet"), split="train")
    assert len(d) == len(examples) and set(d.column_names) >= {"id", "source", "input_ids", "target_starts"}
    assert (cache / "README.md").read_text().startswith("---\nconfigs:")


@pytest.mark.parametrize("as_torch", [False, True])
def test_batches(cache, examples, as_torch):
    if as_torch:
        pytest.importorskip("torch")
    batches = list(CacheReader(cache).batches(7, as_torch=as_torch))
    assert [len(b["ids"]) for b in batches] == [7] * 5 + [5]
    b = batches[1]
    ex = examples[8]
    row = b["ids"].index(ex.id)
    L = len(ex.input_ids)
    assert np.asarray(b["input_ids"][row, :L]).tolist() == ex.input_ids.tolist()
    assert bool(b["attention_mask"][row, :L].all()) and not bool(b["attention_mask"][row, L:].any())
    sel = np.asarray(b["target_batch"]) == row
    assert np.asarray(b["target_position"])[sel].tolist() == ex.target_positions.tolist()
    assert np.asarray(b["topk_ids"])[sel].tolist() == ex.topk_ids.tolist()
    assert (np.asarray(b["labels"][row]) != -100).sum() == ex.num_targets
