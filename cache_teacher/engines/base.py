"""What every teacher engine returns, and `load_engine(config)` to pick one.

Both engines take `Templated` records (cache_teacher.template) and return the same structures, so
run.py writes the same cache from either, up to numerics.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Scored:
    """The teacher at the trained positions of one record (row n predicts token target_positions[n]).

    topk_ids int32 [N, k]; topk_logprobs float32 [N, k] (rank order, raw logprobs at T=1);
    target_logprobs float32 [N] and target_ranks int32 [N] (1-based) of the actual token.
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray
    target_ranks: np.ndarray


@dataclass
class Generated:
    """One sampled response: token_ids int32 [G] (with the end-of-turn token when it stopped) and
    the teacher's top-k at each generated position (arrays as in `Scored`, N = G)."""

    token_ids: np.ndarray
    scored: Scored
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens)


def rank_of(logprobs, actual):
    """1-based rank as vLLM counts it: entries >= the actual token's logprob. logprobs [N, V], actual [N]."""
    return (logprobs >= actual[:, None]).sum(-1)


def load_engine(config):
    if config.engine == "vllm":
        from cache_teacher.engines.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    from cache_teacher.engines.hf_engine import HFEngine

    return HFEngine(config)
