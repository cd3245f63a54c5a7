import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats import codec as C
from formats.errors import FormatError

BOUND = 1 / 64 + 1 / 4096 + 1e-6


@st.composite
def topk_blocks(draw):
    n = draw(st.integers(0, 12))
    k = draw(st.integers(1, 10))
    big = draw(st.booleans())
    lo = 2**31 - 5000 if big else 0
    hi = 2**31 - 2 if big else 3000
    rows_ids, rows_lp = [], []
    for _ in range(n):
        ids = draw(st.lists(st.integers(lo, hi), min_size=k, max_size=k, unique=True))
        lps = draw(st.lists(st.one_of(st.floats(-30, 0, allow_nan=False), st.sampled_from([0.0, -1e30, -5.0])),
                            min_size=k, max_size=k))
        lps = sorted(lps, reverse=True)  # ties allowed
        lps[0] = max(lps[0], -20.0)  # a top-1 below -log(V) is impossible
        pad = draw(st.integers(0, k - 1))
        if pad:
            ids[k - pad :] = [-1] * pad
            lps[k - pad :] = [-np.inf] * pad
        rows_ids.append(ids)
        rows_lp.append(lps)
    ids = np.array(rows_ids, np.int64).reshape(n, k)
    lps = np.array(rows_lp, np.float32).reshape(n, k)
    mass = draw(st.sampled_from([None, 0.5, 0.9, 1.0]))
    return ids, lps, mass, big


@settings(max_examples=150, deadline=None)
@given(topk_blocks())
def test_round_trip(block):
    ids, lps, mass, big = block
    k = ids.shape[1]
    cfg = C.CodecConfig(k=k, mass=mass, hot=4)
    codes = C.IdCodes(C.build_hot_table(ids, cfg.hot))
    id_bytes = 4 if big else 2
    streams = C.encode_topk(ids, lps, cfg, codes, id_bytes)
    out_ids, out_lps, counts = C.decode_topk(streams, cfg, codes)
    assert out_ids.shape == (len(ids), k)
    for r in range(len(ids)):
        c = counts[r]
        valid = int((ids[r] >= 0).sum())
        assert 1 <= c <= valid
        np.testing.assert_array_equal(out_ids[r, :c], ids[r, :c])  # ids lossless, rank order kept
        assert (out_ids[r, c:] == -1).all() and np.isneginf(out_lps[r, c:]).all()
        true, got = lps[r, :c].astype(np.float64), out_lps[r, :c].astype(np.float64)
        near = true >= lps[r, 0] - 2000  # -1e30 stands for "probability 0" and decodes as such
        assert np.all(np.abs(got - true)[near] <= BOUND)
        assert np.all(got[~near] < lps[r, 0] - 2000)
        assert np.all(np.diff(got) <= 0)
        if mass is not None and c < valid:
            assert np.exp(true[:c].astype(np.float64)).sum() >= mass - 1e-6


def test_k1_and_empty_block():
    cfg = C.CodecConfig(k=1)
    codes = C.IdCodes(np.zeros(0, np.uint32))
    ids = np.array([[5], [7]])
    lps = np.array([[-0.1], [0.0]], np.float32)
    out_ids, out_lps, _ = C.decode_topk(C.encode_topk(ids, lps, cfg, codes), cfg, codes)
    np.testing.assert_array_equal(out_ids, ids)
    np.testing.assert_allclose(out_lps, lps, atol=BOUND)
    empty = C.encode_topk(np.zeros((0, 1), np.int64), np.zeros((0, 1), np.float32), cfg, codes)
    assert C.decode_topk(empty, cfg, codes)[0].shape == (0, 1)


def test_encoder_refuses_bad_input():
    cfg = C.CodecConfig(k=3)
    codes = C.IdCodes(np.zeros(0, np.uint32))
    with pytest.raises(ValueError, match="rank order"):
        C.encode_topk(np.array([[1, 2, 3]]), np.array([[-2.0, -1.0, -3.0]], np.float32), cfg, codes)
    with pytest.raises(ValueError, match="no valid top-k entry"):
        C.encode_topk(np.array([[-1, -1, -1]]), np.full((1, 3), -np.inf, np.float32), cfg, codes)
    with pytest.raises(ValueError, match="does not fit"):
        C.encode_topk(np.array([[70000, 1, 2]]), np.array([[-1.0, -2.0, -3.0]], np.float32), cfg, codes, id_bytes=2)
    with pytest.raises(ValueError):
        C.CodecConfig(k=0)
    with pytest.raises(ValueError):
        C.CodecConfig(mass=1.5)


def test_decoder_detects_inconsistent_streams():
    cfg = C.CodecConfig(k=2)
    codes = C.IdCodes(np.zeros(0, np.uint32))
    s = C.encode_topk(np.array([[1, 2], [3, 4]]), np.array([[-1.0, -2.0], [-1.0, -1.5]], np.float32), cfg, codes)
    broken = dict(s, topk_code_b0=s["topk_code_b0"][:-1])
    with pytest.raises(FormatError, match="topk_code_b0"):
        C.decode_topk(broken, cfg, codes)
    with pytest.raises(FormatError, match="escape"):
        C.decode_topk(dict(s, topk_step=b"\xff\x00"), cfg, codes)


def test_hot_table_orders_by_frequency():
    ids = np.array([[5, 9, 2], [9, 5, 7], [9, 1, 2]])
    table = C.build_hot_table(ids, 2)
    assert table.tolist() == [9, 2]  # 9 three times; 2 and 5 twice each, ties by id
    codes = C.IdCodes(table)
    np.testing.assert_array_equal(codes.decode(codes.encode(np.array([9, 2, 5, 1000]))), [9, 2, 5, 1000])


def test_chunked_decode_equals_one_block(monkeypatch):
    rng = np.random.default_rng(0)
    n, k = 50, 6
    ids = np.stack([rng.permutation(300)[:k] for _ in range(n)])
    lps = -np.sort(rng.exponential(3.0, (n, k)), axis=1).astype(np.float32)
    lps[::7, 3] = lps[::7, 2] - 9.0  # big deltas: escapes spread over the chunks
    lps[::7, 4:] = lps[::7, 3:4] - 1.0
    cfg = C.CodecConfig(k=k, mass=0.9)
    codes = C.IdCodes(C.build_hot_table(ids, 16))
    streams = C.encode_topk(ids, lps, cfg, codes)
    whole = C.decode_topk(streams, cfg, codes)
    monkeypatch.setattr(C, "DECODE_CHUNK", 7 * k)
    chunked = C.decode_topk(streams, cfg, codes)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)
