import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats import codec as C
from formats.errors import FormatError

from formats.codec import tie_canonical

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
        lps = draw(
            st.lists(
                st.one_of(st.floats(-30, 0, allow_nan=False), st.sampled_from([0.0, -1e30, -5.0])),
                min_size=k,
                max_size=k,
            )
        )
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


@pytest.mark.parametrize("version", [1, 2])
@settings(max_examples=150, deadline=None)
@given(block=topk_blocks())
def test_round_trip(block, version):
    ids, lps, mass, big = block
    k = ids.shape[1]
    cfg = C.CodecConfig(k=k, mass=mass, hot=4, version=version)
    codes = C.IdCodes(C.build_hot_table(ids, cfg.hot))
    id_bytes = 4 if big else 2
    streams = C.encode_topk(ids, lps, cfg, codes, id_bytes)
    out_ids, out_lps, counts = C.decode_topk(streams, cfg, codes)
    assert out_ids.shape == (len(ids), k)
    for r in range(len(ids)):
        c = counts[r]
        valid = int((ids[r] >= 0).sum())
        assert 1 <= c <= valid
        if version == 1:
            np.testing.assert_array_equal(out_ids[r, :c], ids[r, :c])  # ids lossless, rank order kept
        else:  # ids lossless, rank order kept but inside ties (equal decoded logprobs): increasing code there
            np.testing.assert_array_equal(
                tie_canonical(out_ids[r, :c], out_lps[r, :c]), tie_canonical(ids[r, :c], out_lps[r, :c])
            )
            assert out_ids[r, 0] == ids[r, 0]  # the top-1 stays first
            code = codes.encode(out_ids[r, 1:c])
            tied = out_lps[r, 2:c] == out_lps[r, 1 : c - 1]
            assert (code[1:][tied] > code[:-1][tied]).all()
        assert (out_ids[r, c:] == -1).all() and np.isneginf(out_lps[r, c:]).all()
        true, got = lps[r, :c].astype(np.float64), out_lps[r, :c].astype(np.float64)
        near = true >= lps[r, 0] - 2000  # -1e30 stands for "probability 0" and decodes as such
        assert np.all(np.abs(got - true)[near] <= BOUND)
        assert np.all(got[~near] < lps[r, 0] - 2000)
        assert np.isneginf(got[true < lps[r, 0] - 2048]).all()  # the escape q = 65535 is -inf
        assert np.all(got[1:] <= got[:-1])
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
        C.decode_topk(dict(s, topk_step_1=b"\xff\x00"), cfg, codes)
    with pytest.raises(FormatError, match="topk_step_1 has 1 deltas, expected 2"):
        C.decode_topk(dict(s, topk_step_1=b"\x05"), cfg, codes)
    with pytest.raises(FormatError, match="topk_step_2 holds deltas, but no entry has index >= 2 at k=2"):
        C.decode_topk(dict(s, topk_step_2=b"\x05"), cfg, codes)
    v1 = C.CodecConfig(k=2, version=1)
    s1 = C.encode_topk(np.array([[1, 2], [3, 4]]), np.array([[-1.0, -2.0], [-1.0, -1.5]], np.float32), v1, codes)
    assert "topk_step" in s1 and "topk_step_1" not in s1
    with pytest.raises(FormatError, match="escape"):
        C.decode_topk(dict(s1, topk_step=b"\xff\x00"), v1, codes)


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


def test_escape_code_65535_decodes_to_neg_inf():
    cfg = C.CodecConfig(k=3)
    codes = C.IdCodes(np.zeros(0, np.uint32))
    lps = np.array([[-0.1, -0.5, -2500.0]], np.float32)  # more than 2047.97 nat below the top-1
    out_ids, out_lps, _ = C.decode_topk(C.encode_topk(np.array([[1, 2, 3]]), lps, cfg, codes), cfg, codes)
    assert out_ids.tolist() == [[1, 2, 3]]
    assert np.isneginf(out_lps[0, 2]) and abs(out_lps[0, 1] + 0.5) <= BOUND


def test_nan_logprob_is_refused_by_the_encoders():
    cfg = C.CodecConfig(k=3)
    codes = C.IdCodes(np.zeros(0, np.uint32))
    lps = np.array([[-0.1, -0.5, -1.0], [-0.1, np.nan, -1.0]], np.float32)
    with pytest.raises(ValueError, match="position 1: topk_logprobs holds NaN"):
        C.encode_topk(np.array([[1, 2, 3], [1, 2, 3]]), lps, cfg, codes)
    with pytest.raises(ValueError, match="position 0: target_logprobs holds NaN"):
        C.encode_target(np.array([np.nan], np.float32), np.array([1]))


def test_damaged_stream_lengths_are_format_errors():
    cfg = C.CodecConfig(k=300)  # 2-byte counts
    codes = C.IdCodes(np.zeros(0, np.uint32))
    with pytest.raises(FormatError, match="topk_count has 3 bytes"):
        C.decode_topk(
            {
                "topk_count": b"\x01\x00\x01",
                "topk_top1": b"\0\0",
                "topk_code_b0": b"\0",
                "topk_code_b1": b"\0",
                "topk_step": b"",
                "topk_step_escape": b"",
            },
            cfg,
            codes,
        )
    with pytest.raises(FormatError, match="target_rank"):
        C.decode_target({"target_logprob": b"\0\0", "target_rank": b"\1\0\0"})


def test_a_huge_k_over_few_stored_entries_is_refused_before_allocating():
    cfg = C.CodecConfig(k=65535)
    codes = C.IdCodes(np.zeros(0, np.uint32))
    n = 1 << 16  # 65536 positions x 65535 entries would be 32 GiB of ids and logprobs
    streams = {
        "topk_count": np.ones(n, "<u2").tobytes(),
        "topk_top1": np.zeros(n, "<u2").tobytes(),
        "topk_code_b0": bytes(n),
        "topk_code_b1": bytes(n),
        "topk_step": b"",
        "topk_step_escape": b"",
    }
    with pytest.raises(FormatError, match="refusing to allocate"):
        C.decode_topk(streams, cfg, codes)


@pytest.mark.parametrize("id_bytes", [2, 4])
def test_v2_tie_gaps_past_the_largest_code_are_a_format_error(id_bytes):
    cfg = C.CodecConfig(k=3)
    codes = C.IdCodes(np.zeros(0, np.uint32))
    s = C.encode_topk(np.array([[1, 2, 3]]), np.array([[-1.0, -1.0, -1.0]], np.float32), cfg, codes, id_bytes)
    assert s["topk_step_1"] + s["topk_step_2"] == b"\0\0"  # one tie group: code 1, then gaps 1 and 1
    top = {f"topk_code_b{b}": b"\xff" * 3 for b in range(id_bytes)}
    with pytest.raises(FormatError, match=f"beyond the largest {id_bytes}-byte code"):
        C.decode_topk(dict(s, **top), cfg, codes)
