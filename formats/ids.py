"""The sample-id scheme, in one place: how an input record gets its id, how generate mode names the
samples of one record (`<record id>#s<j>`), and the stable hashes of record ids behind every
selection in kdcache (worker slices, --fraction subsamples, the held-out split). Each is a function
of the id alone, so it does not depend on order, workers, ranks or shard layout, and the teacher
and student stages agree on it."""

from __future__ import annotations

import hashlib
import re
from typing import Any

_SAMPLE_SUFFIX = re.compile(r"#s\d+$")


def stable_hash(text: str, salt: str | None) -> int:
    """64-bit hash of `text`, independent of the Python process (unlike hash()). `salt=None` hashes
    the text alone (the held-out split, which predates salts)."""
    data = text if salt is None else f"{salt}\0{text}"
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


def input_record_id(raw: Any, index: int) -> str:
    """An input row's id: its own `id` (a non-empty string or an integer), else `row-<index>`."""
    rid = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid).strip():
        return str(rid)
    return f"row-{index:09d}"


def sample_ids(record_id_: str, n: int) -> list[str]:
    """The ids the n samples of one record are written under (generate mode); the record's own for n = 1."""
    return [record_id_] if n == 1 else [f"{record_id_}#s{j}" for j in range(n)]


def record_id(example_id: str) -> str:
    """The input record an example came from: generate mode writes `<record id>#s<j>` per sample."""
    return _SAMPLE_SUFFIX.sub("", example_id)


def keep_fraction(record_id_: str, fraction: float, seed: int) -> bool:
    """Deterministic subsample: nested in `fraction` (the 1% set lies inside the 3% set)."""
    return fraction >= 1.0 or stable_hash(record_id_, f"fraction:{seed}") < fraction * 2**64


def worker_of(record_id_: str, num_workers: int) -> int:
    """The worker (of `num_workers`) whose slice holds a record."""
    return stable_hash(record_id_, "worker") % num_workers


def is_eval(example_id: str, eval_fraction: float) -> bool:
    """Held-out iff the record id's hash falls in the first `eval_fraction` of [0, 1): stable across
    runs, ranks, shard layouts and caches that share ids. Samples of one prompt (generate mode:
    `<id>#s<j>`) fall on the same side of the split."""
    if eval_fraction <= 0:
        return False
    return stable_hash(record_id(example_id), None) / 2**64 < eval_fraction
