"""formats/export.py (`kdcache export`): decoded columns equal the reader's values, read by pyarrow and
`datasets` with no kdcache code; the axolotl layout as axolotl's KD trainer reads it (docs/EXPORT.md);
atomic parts, resume after a crash, refusals."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from formats import CacheReader
from formats import export as export_module
from formats.errors import ChecksumError, FormatError, InputError
from formats.export import DONE_NAME, export_cache


def _examples(cache):
    return list(CacheReader(cache, prefetch=0))


def test_decoded_columns_are_the_readers_values(cache, tmp_path):
    record = export_cache(cache, tmp_path / "out", rows_per_file=15, progress=False)
    assert [f["rows"] for f in record["files"]] == [15, 15, 10] and record["examples"] == 40
    table = pq.read_table(tmp_path / "out")  # the folder, as any Parquet reader opens it
    rows = table.to_pylist()
    for ex, row in zip(_examples(cache), rows, strict=True):
        assert row["id"] == ex.id and row["input_ids"] == ex.input_ids.tolist()
        assert row["labels"] == ex.labels.tolist() and json.loads(row["meta"]) == ex.meta
        trained = set(ex.target_positions.tolist())
        for t in range(len(ex.input_ids)):
            if t not in trained:
                assert row["target_token_ids"][t] == [] and row["target_logprobs"][t] == []
        for n, t in enumerate(ex.target_positions.tolist()):
            keep = ex.topk_ids[n] >= 0
            assert row["target_token_ids"][t] == ex.topk_ids[n][keep].tolist()
            np.testing.assert_array_equal(np.float32(row["target_logprobs"][t]), ex.topk_logprobs[n][keep])


def test_decoded_export_loads_with_datasets(cache, tmp_path):
    datasets = pytest.importorskip("datasets")
    export_cache(cache, tmp_path / "out", progress=False)
    ds = datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "out" / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    )
    first = _examples(cache)[0]
    assert len(ds) == 40 and ds[0]["id"] == first.id
    t = int(first.target_positions[0])
    assert ds[0]["target_token_ids"][t] == first.topk_ids[0][first.topk_ids[0] >= 0].tolist()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_axolotl_rows_pair_hidden_state_p_with_token_p_plus_1(cache, tmp_path, temperature):
    record = export_cache(cache, tmp_path / "out", fmt="axolotl", temperature=temperature, progress=False)
    k = record["k"]
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert set(rows[0]) == {
        "input_ids",
        "attention_mask",
        "labels",
        "target_token_ids",
        "target_logprobs",
        "target_mask",
    }
    for ex, row in zip(_examples(cache), rows, strict=True):
        length = len(ex.input_ids)
        assert row["labels"] == ex.labels.tolist() and row["attention_mask"] == [1] * length  # unshifted labels
        ids, lps, mask = (np.asarray(row[c]) for c in ("target_token_ids", "target_logprobs", "target_mask"))
        assert ids.shape == lps.shape == mask.shape == (length, k)  # K entries at every position
        trained_rows = {int(t) - 1 for t in ex.target_positions}
        for p in range(length):
            if p not in trained_rows:
                assert not mask[p].any()
        for n, t in enumerate(ex.target_positions.tolist()):
            p, keep = t - 1, ex.topk_ids[n] >= 0
            m = int(keep.sum())
            assert mask[p].tolist() == [1] * m + [0] * (k - m)
            assert ids[p, :m].tolist() == ex.topk_ids[n][keep].tolist()
            expected = ex.topk_logprobs[n][keep].astype(np.float64) / temperature
            expected -= np.log(np.exp(expected - expected.max()).sum()) + expected.max()
            np.testing.assert_allclose(lps[p, :m], expected, rtol=1e-5, atol=1e-6)
            assert math.isclose(float(np.exp(lps[p, :m].astype(np.float64)).sum()), 1.0, rel_tol=1e-5)


def test_a_crash_mid_export_resumes_to_the_same_files(cache, tmp_path, monkeypatch):
    export_cache(cache, tmp_path / "straight", rows_per_file=10, progress=False)
    calls = {"n": 0}
    real = export_module.decoded_columns

    def crash_at_25(ex):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt  # as a kill would stop it
        return real(ex)

    monkeypatch.setattr(export_module, "decoded_columns", crash_at_25)
    with pytest.raises(KeyboardInterrupt):
        export_cache(cache, tmp_path / "resumed", rows_per_file=10, progress=False)
    left = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert left == ["_export_settings.json", "part-00000.parquet", "part-00001.parquet"]  # no partial part
    with pytest.raises(InputError, match="another cache or with other settings"):
        export_cache(cache, tmp_path / "resumed", rows_per_file=7, progress=False)
    monkeypatch.setattr(export_module, "decoded_columns", real)
    export_cache(cache, tmp_path / "resumed", rows_per_file=10, progress=False)
    for name in [f"part-{i:05d}.parquet" for i in range(4)]:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    a, b = (json.loads((tmp_path / d / DONE_NAME).read_text()) for d in ("straight", "resumed"))
    assert a == b and not (tmp_path / "resumed" / "_export_settings.json").exists()
    assert export_cache(cache, tmp_path / "resumed", rows_per_file=10, progress=False) == a  # done: left as is


def test_refusals(cache, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        export_cache(cache, tmp_path / "full", progress=False)
    with pytest.raises(InputError, match="axolotl only"):
        export_cache(cache, tmp_path / "o1", temperature=2.0, progress=False)
    with pytest.raises(InputError, match="--format 'csv'"):
        export_cache(cache, tmp_path / "o2", fmt="csv", progress=False)
    with pytest.raises(InputError, match="read-only"):  # writable stores: test_remote_write.py
        export_cache(cache, "https://example.org/out", progress=False)
    assert (tmp_path / "full" / "x.txt").read_text() == "mine"


def test_a_tampered_shard_stops_the_export(cache, tmp_path):
    bad = shutil.copytree(cache, tmp_path / "bad")
    shard = sorted(bad.glob("*.parquet"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises((ChecksumError, FormatError), match=shard.name):
        export_cache(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / DONE_NAME).exists()


def test_cli(cache, tmp_path, capsys):
    from kdcache.cli import main

    assert main(["export", str(cache), str(tmp_path / "out"), "--format", "axolotl", "--no-progress"]) == 0
    assert "exported 40 examples" in capsys.readouterr().out
    assert (tmp_path / "out" / DONE_NAME).exists()
