"""What every teacher engine is (`Engine`) and returns (`Scored`, `Generated`); `engines.factory`
picks one.

Both engines take `Templated` records (formats.template) and return the same structures, so
run.py writes the same cache from either, up to numerics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from formats.errors import KDCacheError


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


class Engine(Protocol):
    """A teacher engine (hf_engine.HFEngine, vllm_engine.VLLMEngine). `config` (a CacheConfig) overrides
    the engine's own for one call (k, sampling); items are `Templated` records, results in item order."""

    name: str

    def info(self) -> dict:
        """The teacher's provenance for the manifest (name_or_path, revision, dtype, engine, version)."""
        ...

    def score(self, items, config=None) -> list[Scored]:
        """Teacher-forced top-k at each item's target positions."""
        ...

    def generate(self, items, stop_ids, config=None) -> list[list[Generated]]:
        """Sampled responses per item, each with the teacher's top-k at its generated positions."""
        ...

    def close(self) -> None:
        """Free the model (and the engine's processes)."""
        ...


def rank_of(logprobs, actual):
    """1-based rank as vLLM counts it: entries >= the actual token's logprob. logprobs [N, V], actual [N]."""
    return (logprobs >= actual[:, None]).sum(-1)


class EngineStartError(KDCacheError):
    """The teacher engine could not start: one line with the root cause and the flag that fixes it.
    `details` holds the full text (tracebacks, the engine's own log) that `--verbose` prints."""

    def __init__(self, cause: str, fix: str | None = None, details: str = ""):
        super().__init__(f"{cause}" + (f" — fix: {fix}" if fix else ""))
        self.details = details


# (text in vLLM's error, the flag that fixes it); the first match wins
_VLLM_FIXES = (
    (
        "desired CPU memory utilization",
        "leave out --gpu-memory-utilization (kdcache then sizes the KV cache from "
        "the free memory), or pass --kv-cache-space-gb N below the free memory",
    ),
    ("requested memory for kv", "a smaller --kv-cache-space-gb (or free memory used by other processes)"),
    ("KV cache is needed", "a larger --kv-cache-space-gb, or a smaller --max-length / --max-model-len"),
    (
        "larger than the maximum number of tokens that can be stored in KV cache",
        "a larger --kv-cache-space-gb, or a smaller --max-length / --max-model-len",
    ),
    ("Unsupported CPU attention", "--engine hf (transformers runs any head size)"),
    ("CUDA out of memory", "a lower --gpu-memory-utilization or --max-num-batched-tokens"),
    ("No available memory for the cache blocks", "a higher --gpu-memory-utilization or --kv-cache-space-gb"),
)
# wrappers that only point elsewhere ("See root cause above"): never the root cause themselves
_WRAPPERS = (
    "Engine core initialization failed",
    "WorkerProc initialization failed",
    "Worker failed",
    "See root cause above",
    "EngineDeadError",
    "Worker proc",
)
# "ValueError: ...", also behind a log prefix: "(VllmWorker-0 pid=1) ERROR 11-30 09:35 [x.py:953] ValueError: ..."
_ERROR_LINE = re.compile(r"(?:^|[\s\]])(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception)):\s+(\S.*)$")


def root_cause(text: str) -> str | None:
    """The first `SomeError: message` line of an engine's log/traceback that is not a wrapper, as
    "SomeError: message"; None when there is none."""
    for line in text.splitlines():
        match = _ERROR_LINE.search(line)
        if match and not any(w in line for w in _WRAPPERS):
            return f"{match.group(1)}: {match.group(2).strip()}"
    return None


def engine_start_error(text: str, exc: BaseException) -> EngineStartError:
    """An EngineStartError for vLLM's failure to start: root cause from the captured `text` (its worker
    processes print it there; the exception in this process only says "see root cause above")."""
    cause = root_cause(text) or root_cause(f"{type(exc).__name__}: {exc}") or f"{type(exc).__name__}: {exc}"
    fix = next((f for needle, f in _VLLM_FIXES if needle in cause), None)
    fix = fix or "--engine hf (transformers) runs without vLLM; --verbose shows vLLM's full output"
    return EngineStartError(f"vLLM could not start: {cause}", fix=fix, details=text)
