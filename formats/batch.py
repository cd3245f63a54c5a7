"""Examples -> one padded batch of numpy arrays (or torch tensors): for users of the reader who do
not want train_student's packing."""

from __future__ import annotations

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
        topk_ids[sl, :kk], topk_lps[sl, :kk] = ex.topk_ids, ex.topk_logprobs
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
