import itertools
import json
import logging

import numpy as np
import pytest
from .format_helpers import assert_same_topk, make_example, write_cache

from formats import CacheReader, Example


def ids(reader):
    return [ex.id for ex in reader]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_partitions_cover_every_row_once(cache, examples, world, shuffle):
    parts = [ids(CacheReader(cache, rank=r, world_size=world, shuffle=shuffle, seed=7)) for r in range(world)]
    flat = list(itertools.chain(*parts))
    assert set(flat) <= {e.id for e in examples} and len(flat) == len(set(flat))
    assert [len(p) for p in parts] == [len(examples) // world] * world  # 40 % 3 = 1 left over


def test_few_row_groups_are_split_by_rows(tmp_path, rng):
    exs = [make_example(rng, i) for i in range(7)]
    write_cache(tmp_path / "c", exs, row_group_positions=10**9, shard_max_bytes=10**9)  # one row group
    parts = [ids(CacheReader(tmp_path / "c", rank=r, world_size=3)) for r in range(3)]
    assert parts == [["ex0", "ex1"], ["ex2", "ex3"], ["ex4", "ex5"]]  # ex6 left over (7 % 3)


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
        assert_same_topk(g.topk_ids, g.topk_logprobs, ex.topk_ids)  # the order inside ties is the codec's
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
    table = ds.dataset(str(cache), format="parquet", exclude_invalid_files=True).to_table(
        columns=["id", "input_ids", "num_targets"]
    )
    assert sorted(table.column("id").to_pylist()) == sorted(e.id for e in examples)
    datasets = pytest.importorskip("datasets")
    d = datasets.load_dataset("parquet", data_files=str(cache / "*.parquet"), split="train")
    assert len(d) == len(examples) and set(d.column_names) >= {"id", "source", "input_ids", "target_starts"}
    assert "\nconfigs:\n" in (cache / "README.md").read_text().split("\n---\n")[0]  # the card's header


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
    assert_same_topk(np.asarray(b["topk_ids"])[sel], np.asarray(b["topk_logprobs"])[sel], ex.topk_ids)
    assert (np.asarray(b["labels"][row]) != -100).sum() == ex.num_targets


# ---- balanced partition (issue 9, item 1) -------------------------------------------------------
def tiny_example(i):
    """Two trained positions: `row_group_positions=2 * r` makes row groups of r rows."""
    return Example(
        id=f"t{i:04d}",
        input_ids=np.array([5, 6, 7], np.int32),
        target_positions=np.array([1, 2], np.int32),
        topk_ids=np.array([[1, 2], [3, 4]], np.int32),
        topk_logprobs=np.full((2, 2), -1.0, np.float32),
        target_logprobs=np.full(2, -1.0, np.float32),
        target_ranks=np.ones(2, np.int32),
    )


def layout_cache(path, n, rows_per_group, shard_max_bytes=10**9):
    write_cache(
        path,
        [tiny_example(i) for i in range(n)],
        k=2,
        row_group_positions=2 * rows_per_group,
        shard_max_bytes=shard_max_bytes,
    )
    return path


# (examples, rows per row group, shard size): 23 row groups of 30 (the issue's case), one row group,
# fewer examples than ranks, ragged last groups, several shards
LAYOUTS = [(690, 30, 10**9), (7, 100, 10**9), (3, 1, 10**9), (50, 7, 10**9), (61, 4, 1500), (24, 1, 10**9)]


def epoch_parts(cache, world, shuffle, epochs=1, **kw):
    parts = []
    for r in range(world):
        reader = CacheReader(cache, rank=r, world_size=world, shuffle=shuffle, seed=5, epochs=epochs, prefetch=0, **kw)
        got = ids(reader)
        per_epoch = reader.num_examples()
        parts.append([got[e * per_epoch : (e + 1) * per_epoch] for e in range(epochs)])
        assert len(got) == per_epoch * epochs
    return parts


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ranks_train_every_example_of_an_epoch_once(tmp_path, layout, shuffle):
    n, rows, shard_bytes = layout
    cache = layout_cache(tmp_path / "c", n, rows, shard_bytes)
    everything = {f"t{i:04d}" for i in range(n)}
    for world in range(1, 10):
        parts = epoch_parts(cache, world, shuffle, epochs=2)
        for epoch in range(2):
            slices = [p[epoch] for p in parts]
            union = set(itertools.chain(*slices))
            assert len({len(s) for s in slices}) == 1, (world, [len(s) for s in slices])  # equal step counts
            assert sum(len(s) for s in slices) == len(union)  # disjoint
            assert union <= everything and len(everything - union) == n % world < world  # at most world-1 left
        if shuffle and n >= 24 and world > 1:
            assert parts[0][0] != parts[0][1]  # a new order every epoch


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_drop_remainder_ranks_read_every_example(tmp_path, layout):
    """Evaluation: every example once across ranks, counts differing by at most one."""
    n, rows, shard_bytes = layout
    cache = layout_cache(tmp_path / "c", n, rows, shard_bytes)
    for world in (1, 2, 3, 7, 8):
        slices = [p[0] for p in epoch_parts(cache, world, False, drop_remainder=False)]
        assert max(map(len, slices)) - min(map(len, slices)) <= 1
        assert sorted(itertools.chain(*slices)) == sorted(f"t{i:04d}" for i in range(n))


def test_issue_case_23_row_groups_on_8_ranks(tmp_path, caplog):
    cache = layout_cache(tmp_path / "c", 690, 30)
    assert len(CacheReader(cache).units) == 23
    with caplog.at_level(logging.WARNING, logger="formats"):
        readers = [CacheReader(cache, rank=r, world_size=8, shuffle=True) for r in range(8)]
    assert [r.num_examples() for r in readers] == [86] * 8 and readers[0].leftover == 2
    assert "2 of 690 examples" in caplog.text and caplog.text.count("left over") == 1  # said once, by rank 0


def test_a_rank_reads_a_contiguous_stretch_of_row_groups(tmp_path, monkeypatch):
    cache = layout_cache(tmp_path / "c", 690, 30)
    loaded = []
    orig = CacheReader.load_unit
    monkeypatch.setattr(CacheReader, "load_unit", lambda self, unit: loaded.append(unit) or orig(self, unit))
    for r in range(8):
        ids(CacheReader(cache, rank=r, world_size=8, shuffle=True, seed=1, prefetch=0))
    assert len(loaded) <= 23 + 7  # each row group once; only those at a boundary between ranks twice


@pytest.mark.parametrize("world", [1, 3, 8])
def test_resume_mid_epoch_is_exact_on_every_rank(tmp_path, world):
    cache = layout_cache(tmp_path / "c", 61, 4, 1500)
    for rank in range(world):

        def reader():
            return CacheReader(cache, rank=rank, world_size=world, shuffle=True, seed=9, epochs=2, prefetch=1)

        full = ids(reader())
        for cut in sorted({0, 1, 3, len(full) // 2, len(full) - 1}):
            r = reader()
            it = iter(r)
            head = [next(it).id for _ in range(cut)]
            r2 = reader()
            r2.load_state_dict(json.loads(json.dumps(r.state_dict())))
            assert head + ids(r2) == full, (rank, cut)


def test_cursor_of_the_old_partition_is_refused(tmp_path):
    cache = layout_cache(tmp_path / "c", 20, 4)
    old = {"epoch": 0, "unit": 1, "row": 2, "seed": 0, "shuffle": False, "rank": 0, "world_size": 1, "units": 5}
    with pytest.raises(ValueError, match="older kdcache"):
        CacheReader(cache).load_state_dict(old)


def test_abandoning_a_reader_midway_returns_at_once(tmp_path):
    """The decode-ahead thread, done and waiting to hand over its end marker, must not hold up close()."""
    import time

    cache = layout_cache(tmp_path / "c", 8, 4)
    it = iter(CacheReader(cache, prefetch=1))
    next(it)
    time.sleep(0.3)  # the thread decodes the second row group and blocks handing over the end
    t0 = time.perf_counter()
    it.close()
    assert time.perf_counter() - t0 < 1.0
