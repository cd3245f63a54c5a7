"""The hf engine against a plain per-record forward (padding, batching and gathers must not matter)."""

from __future__ import annotations

import numpy as np
import torch

from cache_teacher.engines.hf_engine import HFEngine
from formats.template import ChatTemplater

from ..teacher_helpers import make_config

ATOL = 1e-4  # float32 logprobs of the same model, batched vs one record at a time


def test_hf_engine_matches_a_plain_forward(tiny_dir, tokenizer, sample_rows):
    config = make_config(teacher=str(tiny_dir), out="unused", k=5, hf_batch_tokens=600)  # several batches
    templater = ChatTemplater(tokenizer, max_length=200)
    items = [templater.score(r) for r in sample_rows[:7]]
    assert len({len(i.input_ids) for i in items}) > 2
    engine = HFEngine(config)
    got = engine.score(items, config)
    for item, s in zip(items, got):
        with torch.inference_mode():
            logits = engine.model(torch.from_numpy(item.input_ids.astype(np.int64))[None]).logits[0]
        lp = torch.log_softmax(logits.float(), -1)[item.target_positions - 1]  # row t-1 predicts token t
        top_lp, top_ids = lp.topk(5, -1)
        actual = torch.from_numpy(item.input_ids[item.target_positions].astype(np.int64))
        act_lp = lp.gather(1, actual[:, None])[:, 0]
        assert np.mean(s.topk_ids == top_ids.numpy()) > 0.999
        np.testing.assert_allclose(s.topk_logprobs, top_lp.numpy(), atol=ATOL)
        np.testing.assert_allclose(s.target_logprobs, act_lp.numpy(), atol=ATOL)
        # The rank is exact up to logits within rounding of the actual token's: batched (padded) and
        # single forwards round differently, so a near-tie may fall on either side.
        lowest = (lp > act_lp[:, None] + ATOL).sum(-1).numpy() + 1
        highest = (lp >= act_lp[:, None] - ATOL).sum(-1).numpy()
        assert np.all((lowest <= s.target_ranks) & (s.target_ranks <= highest))
        assert s.topk_ids.dtype == np.int32 and s.target_ranks.min() >= 1
