"""One cached example, decoded: what writers take and readers give back."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = -100  # the label of a position that is not trained (Hugging Face's convention)


@dataclass
class Example:
    """A templated conversation and the teacher's top-k at each trained position.

    `target_positions[n]` is a position t in `input_ids` (1 <= t < L) whose token is trained; row n of
    the teacher arrays is the teacher's distribution over token t given tokens 0..t-1. Mass-adaptive
    caches keep fewer than K entries at some rows: padding ids are -1 and padding logprobs -inf.

    Shapes: input_ids int32 [L]; target_positions int32 [N] (strictly increasing);
    topk_ids int32 [N, K]; topk_logprobs float32 [N, K] (rank order, raw logprobs at temperature 1);
    target_logprobs float32 [N] and target_ranks int32 [N] (1-based) for the actual token input_ids[t].
    """

    id: str
    input_ids: np.ndarray
    target_positions: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray
    target_ranks: np.ndarray
    source: str = ""
    finish_reason: str | None = None  # generate mode: "stop" or "length"; None for scored data
    meta: dict = field(default_factory=dict)  # small JSON-able extras (e.g. sample index)

    @property
    def num_targets(self) -> int:
        return int(len(self.target_positions))

    @property
    def tail_mass(self) -> np.ndarray:
        """Teacher mass outside the stored entries, 1 - sum_k exp(logprob_k), float32 [N]."""
        with np.errstate(under="ignore"):
            s = np.exp(self.topk_logprobs.astype(np.float64)).sum(axis=1)
        return np.clip(1.0 - s, 0.0, 1.0).astype(np.float32)

    @property
    def labels(self) -> np.ndarray:
        """int64 [L]: input_ids at trained positions, IGNORE_INDEX (-100) elsewhere (HF convention, unshifted)."""
        out = np.full(len(self.input_ids), IGNORE_INDEX, np.int64)
        out[self.target_positions] = self.input_ids[self.target_positions]
        return out
