"""What the machine computes natively, for the hardware-aware defaults of both stages.

    from formats.common.hardware import auto_dtype
    dtype, reason = auto_dtype()          # e.g. ("float32", "cpu AMD EPYC: no amx_bf16/avx512_bf16 ...")

The rule (docs/BENCHMARKS.md has the measurements behind it): bfloat16 where the hardware has bf16
arithmetic (CUDA compute capability >= 8.0; x86 CPUs with `amx_bf16` or `avx512_bf16`), float32
elsewhere: on an AVX2-only CPU bf16 runs 4-6x slower than float32 (it is emulated). float16 is never
chosen automatically. A CPU's flags count only where torch may use them: `ONEDNN_MAX_CPU_ISA` (or
`DNNL_MAX_CPU_ISA`) below AVX512_CORE_BF16 takes bf16 out of oneDNN's matmuls, and
`ATEN_CPU_CAPABILITY=avx2|default` keeps ATen's kernels off AVX-512 (together they emulate an
AVX2-only machine on an AVX-512 one; `usable_cpu_flags`). Needs torch only to ask about CUDA, and
imports it lazily.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic
ISA_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # read by _isa_caps
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what the benchmark tables show
CPUINFO = Path("/proc/cpuinfo")


@lru_cache(maxsize=None)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ("unknown", {}) where there is none."""
    model, flags = "unknown", frozenset()
    try:
        text = CPUINFO.read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model != "unknown" and flags:
            break
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def _isa_caps() -> list[tuple[str, str, tuple[str, ...]]]:
    """(variable, value, flags it takes away) for each environment cap on the ISA torch may use."""
    caps = []
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten in ("default", "avx2"):  # ATen's vectorized kernels stop below AVX-512
        caps.append(("ATEN_CPU_CAPABILITY", aten, ("avx512", "amx")))
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        onednn = os.environ.get(name, "").strip().upper()
        if not onednn or onednn == "ALL" or any(part in onednn for part in ("BF16", "FP16", "AMX", "AVX10")):
            continue  # no cap, or one that keeps oneDNN's bf16 instructions
        gone = ("avx512_bf16", "amx") if onednn.startswith("AVX512") else ("avx512", "amx")
        caps.append((name, onednn, gone))
    return caps


def usable_cpu_flags() -> tuple[frozenset[str], str]:
    """(the CPU flags torch may use, the environment caps that removed some: "" where none did)."""
    flags, why = cpu_flags(), []
    for name, value, gone in _isa_caps():
        removed = {f for f in cpu_flags() if f.startswith(gone)}
        if removed:
            flags = flags - removed
            why.append(f"{name}={value}")
    return frozenset(flags), ", ".join(why)


def cpu_summary() -> str:
    """The processor and its relevant flags, e.g. "AMD EPYC (avx2; no avx512f, avx512_bf16, amx_bf16)"."""
    flags = cpu_flags()
    have = [f for f in REPORTED_CPU_FLAGS if f in flags]
    lack = [f for f in REPORTED_CPU_FLAGS if f not in flags]
    capped = usable_cpu_flags()[1]
    return (
        f"{cpu_model()} ({', '.join(have) or 'none of ' + ', '.join(REPORTED_CPU_FLAGS)}"
        + (f"; no {', '.join(lack)}" if have and lack else "")
        + (f"; torch capped by {capped}" if capped else "")
        + ")"
    )


def default_device() -> str:
    """ "cuda" where torch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16(device: str | None = None) -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, a short reason naming the hardware)."""
    device = str(device or default_device())
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        if (major, minor) >= (8, 0):
            return True, f"{name}: compute capability {major}.{minor} >= 8.0 has native bf16"
        return False, f"{name}: compute capability {major}.{minor} < 8.0 has no native bf16"
    flags, capped = usable_cpu_flags()
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    if found:
        return True, f"cpu {cpu_model()}: {'/'.join(found)} computes bf16 natively"
    if capped and any(f in cpu_flags() for f in BF16_CPU_FLAGS):
        return False, f"cpu {cpu_model()}: {capped} keeps torch off its bf16 instructions (bf16 would be emulated)"
    return False, f"cpu {cpu_model()}: no {'/'.join(BF16_CPU_FLAGS)} (bf16 would be emulated, several times slower)"


def auto_dtype(device: str | None = None) -> tuple[str, str]:
    """("bfloat16" or "float32", why) for `device` (default: cuda when available, else cpu)."""
    native, why = native_bf16(device)
    return ("bfloat16", why) if native else ("float32", why)


def resolve_dtype(requested: str, device: str | None = None) -> tuple[str, str]:
    """`requested` unless it is "auto"; then `auto_dtype(device)`. Returns (dtype, reason)."""
    if requested != "auto":
        return requested, "asked for (--dtype)"
    dtype, why = auto_dtype(device)
    return dtype, f"auto: {why}"


def available_memory_bytes() -> int:
    """Memory a new job can take now: the smaller of the system's MemAvailable and NUMA node 0's
    free + file cache + reclaimable (what vLLM's CPU worker checks its settings against)."""
    import psutil

    available = int(psutil.virtual_memory().available)
    node = Path("/sys/devices/system/node/node0/meminfo")
    try:
        info = {}
        for line in node.read_text().splitlines():  # "Node 0 MemFree:  3931448 kB"
            parts = line.split()
            if len(parts) >= 4:
                info[parts[2].rstrip(":")] = int(parts[3]) * 1024
        node_available = sum(info[key] for key in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable"))
        available = min(available, node_available)
    except (OSError, KeyError, ValueError):
        pass
    return available
