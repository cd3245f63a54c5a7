"""Helpers shared by the cache_teacher tests, imported relatively (`from .teacher_helpers import ...`):
test folders are packages, so helpers and test files of different folders never shadow each other."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
SAMPLE = Path(os.environ.get("KDCACHE_TULU_SAMPLE", REPO.parent / "shared" / "data" / "tulu3_sft_sample.jsonl"))
TEST_CACHE = REPO / "runs" / "test-cache"  # ignored by git; reused across test sessions


def make_config(**overrides):
    """A CacheConfig with test-friendly defaults (small k, short rows, no progress bar)."""
    from cache_teacher.config import make_config as _make

    values = dict(
        k=8,
        max_length=256,
        progress=False,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        kv_cache_space_gb=1,
        max_model_len=640,
        max_new_tokens=24,
        batch_size=16,
        hf_batch_tokens=2048,
        dtype="float32",
        engine="hf",
    )
    values.update(overrides)
    return _make(**values)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
