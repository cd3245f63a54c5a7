"""Examples -> batches: `pad_batch` (padded numpy arrays or torch tensors, for users of the reader who do
not want train_student's packing); `example_rows` (one example per token, Hugging Face's unshifted layout:
what `kdcache export`, `train_student.hf` and train_student's packer build on) and `concat_rows` (examples
end to end, the packed sequence)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from formats.example import IGNORE_INDEX, Example


def pad_batch(examples: list[Example], as_torch: bool = False) -> dict:
    """Pad a list of examples into a batch.

    Returns input_ids int32 [B, L] (0-padded), attention_mask bool [B, L], labels int64 [B, L]
    (IGNORE_INDEX, -100, where not trained), and the teacher's rows flattened over the batch: target_batch and
    target_position int64 [N] (where each row belongs), topk_ids int32 [N, K] (-1 padded),
    topk_logprobs float32 [N, K] (-inf padded), target_logprobs float32 [N], target_ranks int32 [N].
    """
    b = len(examples)
    length = max((len(ex.input_ids) for ex in examples), default=0)
    k = max((ex.topk_ids.shape[1] for ex in examples if ex.num_targets), default=1)
    input_ids = np.zeros((b, length), np.int32)
    mask = np.zeros((b, length), bool)
    labels = np.full((b, length), IGNORE_INDEX, np.int64)
    n = sum(ex.num_targets for ex in examples)
    topk_ids = np.full((n, k), -1, np.int32)
    topk_lps = np.full((n, k), -np.inf, np.float32)
    tb, tp = np.zeros(n, np.int64), np.zeros(n, np.int64)
    tlp, trank = np.zeros(n, np.float32), np.zeros(n, np.int32)
    row = 0
    for i, ex in enumerate(examples):
        L, m = len(ex.input_ids), ex.num_targets
        input_ids[i, :L] = ex.input_ids
        mask[i, :L] = True
        labels[i, :L] = ex.labels
        sl = slice(row, row + m)
        kk = ex.topk_ids.shape[1] if m else 0
        topk_ids[sl, :kk], topk_lps[sl, :kk] = ex.topk_ids[:, :kk], ex.topk_logprobs[:, :kk]
        tb[sl], tp[sl] = i, ex.target_positions
        tlp[sl], trank[sl] = ex.target_logprobs, ex.target_ranks
        row += m
    batch = {
        "ids": [ex.id for ex in examples],
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "target_batch": tb,
        "target_position": tp,
        "topk_ids": topk_ids,
        "topk_logprobs": topk_lps,
        "target_logprobs": tlp,
        "target_ranks": trank,
    }
    if as_torch:
        import torch

        batch = {key: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for key, v in batch.items()}
    return batch


@dataclass
class ExampleRows:
    """One example laid out per token, Hugging Face's convention (unshifted): row t holds token t's label
    and the teacher's top-k for token t (its distribution given tokens 0..t-1); rows that are not trained
    hold IGNORE_INDEX, -1 ids and -inf logprobs. Shapes: input_ids, labels int64 [L]; topk_ids int32
    [L, K]; topk_logprobs float32 [L, K]. Row 0 is never trained (nothing predicts it), so shifting a
    concatenation of examples by one never lets one example's last position predict the next's first.

    truncated: the example was cut to max_tokens; dropped: its trained positions past the cut.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    truncated: bool = False
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def example_rows(ex: Example, k: int, max_tokens: int | None = None) -> ExampleRows:
    """`ex` per token (ExampleRows), K = k columns (an example with fewer entries is padded, one with more
    keeps its first k: the cache's rank order); cut to its first `max_tokens` tokens if longer."""
    length = len(ex.input_ids)
    tp = ex.target_positions.astype(np.int64)
    t_ids, t_lps = ex.topk_ids, ex.topk_logprobs
    truncated, dropped = False, 0
    if max_tokens is not None and length > max_tokens:
        length, truncated = max_tokens, True
        keep = tp < length
        dropped = int((~keep).sum())
        tp, t_ids, t_lps = tp[keep], t_ids[keep], t_lps[keep]
    labels = np.full(length, IGNORE_INDEX, np.int64)
    labels[tp] = ex.input_ids[tp]
    ids = np.full((length, k), -1, np.int32)
    lps = np.full((length, k), -np.inf, np.float32)
    kk = min(k, t_ids.shape[1]) if t_ids.ndim == 2 else 0
    ids[tp, :kk] = t_ids[:, :kk]
    lps[tp, :kk] = t_lps[:, :kk]
    return ExampleRows(ex.input_ids[:length].astype(np.int64), labels, ids, lps, truncated, dropped)


def concat_rows(rows: list[ExampleRows]) -> dict[str, np.ndarray]:
    """Examples' rows end to end, one packed sequence: input_ids, position_ids (restarting at 0 for each
    example), labels [S]; topk_ids, topk_logprobs [S, K] (K = the widest; narrower ones padded)."""
    k = max((r.topk_ids.shape[1] for r in rows), default=1)

    def widen(a, fill, dtype):
        return a if a.shape[1] == k else np.concatenate([a, np.full((len(a), k - a.shape[1]), fill, dtype)], 1)

    return {
        "input_ids": np.concatenate([r.input_ids for r in rows]),
        "position_ids": np.concatenate([np.arange(len(r), dtype=np.int64) for r in rows]),
        "labels": np.concatenate([r.labels for r in rows]),
        "topk_ids": np.concatenate([widen(r.topk_ids, -1, np.int32) for r in rows]),
        "topk_logprobs": np.concatenate([widen(r.topk_logprobs, -np.inf, np.float32) for r in rows]),
    }
