"""cache_teacher.engines.base: `rank_of` (vLLM's rank), `root_cause` of an engine's log, and
`engine_start_error` / `EngineStartError` (one line: the cause and the flag that fixes it).
tests/cache_teacher/test_defaults.py checks one captured vLLM failure end to end; here each rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_teacher.engines import base
from cache_teacher.engines.base import EngineStartError, engine_start_error, rank_of, root_cause
from formats.errors import KDCacheError

# ---- rank_of -------------------------------------------------------------------------------------------


def test_rank_of_is_one_based_and_counts_ties_as_ahead():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -2.0, -2.0, -5.0], [-0.5, -0.5, -0.5, -0.5]])
    actual = torch.tensor([-1.0, -2.0, -0.5])  # the top token; a token tied with one other; all tied
    assert rank_of(logprobs, actual).tolist() == [1, 3, 4]


def test_rank_of_the_last_token_is_the_vocabulary_size_and_works_on_numpy():
    logprobs = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert rank_of(logprobs, logprobs[:, 3]).tolist() == [4]
    assert rank_of(logprobs, logprobs[:, 1]).tolist() == [2]


# ---- root_cause ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, cause",
    [
        ("ValueError: bad head size 80", "ValueError: bad head size 80"),
        # behind a worker's log prefix, the module path of the exception dropped
        (
            "(VllmWorker-0 pid=7) ERROR 11-30 09:35 [gpu_worker.py:12] torch.OutOfMemoryError: CUDA out of memory.  ",
            "OutOfMemoryError: CUDA out of memory.",
        ),
        (
            "INFO loading\nvllm.engine.SomeException: no KV cache is needed here",
            "SomeException: no KV cache is needed here",
        ),
        # wrappers that only point elsewhere are skipped; the first real error wins
        (
            "RuntimeError: Engine core initialization failed. See root cause above.\n"
            "Exception: WorkerProc initialization failed\n"
            "KeyError: 'rope_scaling'\n"
            "ValueError: a later error",
            "KeyError: 'rope_scaling'",
        ),
    ],
)
def test_root_cause_finds_the_first_real_error_line(text, cause):
    assert root_cause(text) == cause


@pytest.mark.parametrize(
    "text",
    [
        "",
        "INFO 11-30 starting the engine\nWARNING nothing went wrong",
        "ValueError:",  # no message
        "RuntimeError: Worker failed with error 'x', please check the stack trace above for the root cause",
        "notanerror: this line names no Error or Exception class",
    ],
)
def test_root_cause_is_none_without_a_real_error_line(text):
    assert root_cause(text) is None


# ---- engine_start_error ----------------------------------------------------------------------------------


@pytest.mark.parametrize("needle, fix", base._VLLM_FIXES)
def test_each_known_failure_gets_its_fix(needle, fix):
    log = f"(EngineCore pid=1) ERROR [core.py:1] ValueError: something: {needle} (details)"
    exc = engine_start_error(log, RuntimeError("Engine core initialization failed. See root cause above."))
    assert str(exc) == f"vLLM could not start: ValueError: something: {needle} (details) — fix: {fix}"


def test_the_first_matching_fix_wins():
    # "KV cache is needed" and "CUDA out of memory" both appear: the earlier rule in _VLLM_FIXES wins
    log = "ValueError: CUDA out of memory; more KV cache is needed than fits"
    exc = engine_start_error(log, RuntimeError("x"))
    assert str(exc).endswith("— fix: a larger --kv-cache-space-gb, or a smaller --max-length / --max-model-len")


def test_without_a_captured_cause_the_exception_is_the_cause():
    exc = engine_start_error("no error lines here\n", MemoryError("CUDA out of memory while allocating"))
    assert str(exc).startswith("vLLM could not start: MemoryError: CUDA out of memory while allocating — fix: ")
    assert "--gpu-memory-utilization" in str(exc)


def test_an_unknown_failure_points_at_the_hf_engine_and_verbose():
    exc = engine_start_error("", ImportError("libcuda.so.1: cannot open shared object file"))
    assert str(exc) == (
        "vLLM could not start: ImportError: libcuda.so.1: cannot open shared object file — fix: --engine hf "
        "(transformers) runs without vLLM; --verbose shows vLLM's full output"
    )


def test_engine_start_error_keeps_the_full_text_as_details_and_is_one_line():
    log = "line one\nTraceback (most recent call last):\nValueError: Unsupported CPU attention head size 80\n"
    exc = engine_start_error(log, RuntimeError("see above"))
    assert isinstance(exc, KDCacheError) and exc.details == log
    assert "\n" not in str(exc) and str(exc).endswith("— fix: --engine hf (transformers runs any head size)")


def test_engine_start_error_class_without_a_fix_is_the_cause_alone():
    exc = EngineStartError("the teacher could not start: no GPU")
    assert str(exc) == "the teacher could not start: no GPU" and exc.details == ""
    assert str(EngineStartError("cause", fix="--engine hf", details="log")) == "cause — fix: --engine hf"
