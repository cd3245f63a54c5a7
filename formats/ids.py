"""Stable hashes of record ids: every selection in kdcache (worker slices, --fraction subsamples,
the held-out split) is a function of the id alone, so it does not depend on order, workers,
ranks or shard layout, and the teacher and student stages agree on it."""
from __future__ import annotations

import hashlib
import re

_SAMPLE_SUFFIX = re.compile(r"#s\d+$")


def stable_hash(text: str, salt: str) -> int:
    """64-bit hash of `text`, independent of the Python process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(f"{salt}\0{text}".encode(), digest_size=8).digest(), "big")


def record_id(example_id: str) -> str:
    """The input record an example came from: generate mode writes `<record id>#s<j>` per sample."""
    return _SAMPLE_SUFFIX.sub("", example_id)


def keep_fraction(record_id_: str, fraction: float, seed: int) -> bool:
    """Deterministic subsample: nested in `fraction` (the 1% set lies inside the 3% set)."""
    return fraction >= 1.0 or stable_hash(record_id_, f"fraction:{seed}") < fraction * 2**64
