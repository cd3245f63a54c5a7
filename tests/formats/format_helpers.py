"""Factories for the formats tests (a uniquely named module: every test folder has a conftest.py)."""
import numpy as np

from formats import CacheWriter, CodecConfig, Example


def make_example(rng, i, *, vocab=1000, k=8, min_len=6, max_len=40, prefix="ex"):
    """A random example whose teacher entries come from a real softmax (sorted, distinct ids)."""
    L = int(rng.integers(min_len, max_len))
    input_ids = rng.integers(0, vocab, L).astype(np.int32)
    start = int(rng.integers(1, L))
    pos = np.arange(start, L, dtype=np.int32)
    n = len(pos)
    logits = rng.normal(scale=3.0, size=(n, vocab))
    lp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    top = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    actual = input_ids[pos]
    ranks = (lp > lp[np.arange(n), actual][:, None]).sum(1) + 1
    return Example(id=f"{prefix}{i}", source="unit", input_ids=input_ids, target_positions=pos,
                   topk_ids=top.astype(np.int32), topk_logprobs=np.take_along_axis(lp, top, 1).astype(np.float32),
                   target_logprobs=lp[np.arange(n), actual].astype(np.float32), target_ranks=ranks.astype(np.int32))


PROVENANCE = {"teacher": {"name_or_path": "unit-teacher", "dtype": "bfloat16", "engine": "none"},
              "tokenizer": {"name_or_path": "unit", "fingerprint": "abc", "vocab_size": 1000, "chat_template_sha256": "t"},
              "dataset": {"name": "unit", "split": "train"}, "mode": "score"}


def write_cache(path, examples, *, k=8, rejects=(), provenance=PROVENANCE, **kw):
    kw.setdefault("row_group_positions", 64)
    kw.setdefault("shard_max_bytes", 4000)
    with CacheWriter(path, codec=CodecConfig(k=k), provenance=provenance, **kw) as w:
        for ex in examples:
            w.write(ex)
        for rid, reason in rejects:
            w.reject(rid, reason)
    return w.manifest


