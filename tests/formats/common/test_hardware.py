"""formats/common/hardware.py: parsing /proc/cpuinfo, the environment caps on the ISA torch may use
(_isa_caps, usable_cpu_flags), cpu_summary, and the reasons native_bf16 gives. A CPU is faked through the
module's own points (CPUINFO, _cpuinfo, ISA_CAP_VARIABLES), as tests/cache_teacher/test_defaults.py does;
that file covers auto_dtype and resolve_dtype per CPU and GPU, and available_memory_bytes."""

from __future__ import annotations

import pytest

from formats.common import hardware

AVX2 = "fpu sse sse2 avx avx2 fma"
AVX512 = AVX2 + " avx512f avx512bw avx512_vnni"
AVX512_BF16 = AVX512 + " avx512_bf16"
AMX = AVX512_BF16 + " amx_tile amx_bf16 amx_int8"


@pytest.fixture
def cpu(monkeypatch):
    """cpu(flags, model): this CPU, with no ISA cap set in the environment."""
    for name in hardware.ISA_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def fake(flags: str, model: str = "Test CPU"):
        monkeypatch.setattr(hardware, "_cpuinfo", lambda: (model, frozenset(flags.split())))

    return fake


@pytest.fixture
def cpuinfo(monkeypatch, tmp_path):
    """cpuinfo(text): /proc/cpuinfo holds `text` (the cache cleared before and after)."""

    def fake(text: str):
        (tmp_path / "cpuinfo").write_text(text)
        monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "cpuinfo")
        hardware._cpuinfo.cache_clear()

    yield fake
    hardware._cpuinfo.cache_clear()


# ---- /proc/cpuinfo -------------------------------------------------------------------------


def test_the_first_processor_gives_the_model_and_the_flags(cpuinfo):
    cpuinfo(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n"
        f"flags\t\t: {AVX512_BF16}\n\n"
        "processor\t: 1\nmodel name\t: Other CPU\nflags\t\t: fpu\n"
    )
    assert hardware._cpuinfo() == ("AMD EPYC 9654 96-Core Processor", frozenset(AVX512_BF16.split()))
    assert hardware.cpu_model() == "AMD EPYC 9654 96-Core Processor"
    assert "avx512_bf16" in hardware.cpu_flags() and "fpu" in hardware.cpu_flags()


def test_a_cpuinfo_without_a_model_name_is_unknown(cpuinfo):
    cpuinfo(f"processor\t: 0\nFeatures\t: fp asimd\nflags\t: {AVX2}\n")  # e.g. some ARM and VM kernels
    assert hardware.cpu_model() == "unknown" and hardware.cpu_flags() == frozenset(AVX2.split())


def test_a_cpuinfo_without_flags_has_none(cpuinfo):
    cpuinfo("processor\t: 0\nmodel name\t: Tiny\n")
    assert hardware._cpuinfo() == ("Tiny", frozenset())
    assert hardware.native_bf16("cpu") == (
        False,
        "cpu Tiny: no amx_bf16/avx512_bf16 (bf16 would be emulated, several times slower)",
    )


def test_the_cpuinfo_is_read_once(cpuinfo, tmp_path):
    cpuinfo(f"model name\t: First\nflags\t: {AVX2}\n")
    assert hardware.cpu_model() == "First"
    (tmp_path / "cpuinfo").write_text("model name\t: Second\n")
    assert hardware.cpu_model() == "First"  # lru_cache: the file is not parsed on every call


# ---- the ISA caps ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("ATEN_CPU_CAPABILITY", "avx2", [("ATEN_CPU_CAPABILITY", "avx2", ("avx512", "amx"))]),
        ("ATEN_CPU_CAPABILITY", " DEFAULT ", [("ATEN_CPU_CAPABILITY", "default", ("avx512", "amx"))]),
        ("ATEN_CPU_CAPABILITY", "avx512", []),
        ("ONEDNN_MAX_CPU_ISA", "avx2", [("ONEDNN_MAX_CPU_ISA", "AVX2", ("avx512", "amx"))]),
        (
            "ONEDNN_MAX_CPU_ISA",
            "AVX512_CORE_VNNI",
            [("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI", ("avx512_bf16", "amx"))],
        ),
        ("DNNL_MAX_CPU_ISA", "sse41", [("DNNL_MAX_CPU_ISA", "SSE41", ("avx512", "amx"))]),
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", []),
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_FP16", []),
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX", []),
        ("ONEDNN_MAX_CPU_ISA", "AVX10_1_512", []),
        ("ONEDNN_MAX_CPU_ISA", "all", []),
        ("ONEDNN_MAX_CPU_ISA", "", []),
    ],
)
def test_isa_caps_read_each_variable(cpu, monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    assert hardware._isa_caps() == expected


def test_every_variable_isa_caps_reads_is_listed():
    assert set(hardware.ISA_CAP_VARIABLES) == {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}


def test_usable_flags_are_all_flags_without_a_cap(cpu):
    cpu(AMX)
    assert hardware.usable_cpu_flags() == (frozenset(AMX.split()), "")


def test_an_aten_cap_removes_every_avx512_and_amx_flag(cpu, monkeypatch):
    cpu(AMX)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    flags, why = hardware.usable_cpu_flags()
    assert flags == frozenset(AVX2.split()) and why == "ATEN_CPU_CAPABILITY=avx2"


def test_an_avx512_onednn_cap_keeps_avx512_but_not_its_bf16(cpu, monkeypatch):
    cpu(AMX)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core")
    flags, why = hardware.usable_cpu_flags()
    assert flags == frozenset(AVX512.split()) and why == "ONEDNN_MAX_CPU_ISA=AVX512_CORE"


def test_caps_that_remove_nothing_are_not_reported(cpu, monkeypatch):
    cpu(AVX2)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert hardware.usable_cpu_flags() == (frozenset(AVX2.split()), "")


def test_several_caps_are_all_named(cpu, monkeypatch):
    cpu(AVX512_BF16)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")
    assert hardware.usable_cpu_flags()[1] == "ATEN_CPU_CAPABILITY=default, DNNL_MAX_CPU_ISA=AVX512_CORE"


# ---- cpu_summary, native_bf16's reasons -----------------------------------------------------


def test_cpu_summary_lists_what_the_cpu_has_and_lacks(cpu):
    cpu(AVX512_BF16, "Intel Xeon")
    assert hardware.cpu_summary() == "Intel Xeon (avx2, avx512f, avx512_bf16; no amx_bf16)"
    cpu(AMX, "Intel Xeon")
    assert hardware.cpu_summary() == "Intel Xeon (avx2, avx512f, avx512_bf16, amx_bf16)"
    cpu("fpu sse", "Old CPU")
    assert hardware.cpu_summary() == "Old CPU (none of avx2, avx512f, avx512_bf16, amx_bf16)"


def test_cpu_summary_names_a_cap_but_still_shows_the_hardware(cpu, monkeypatch):
    cpu(AVX512_BF16, "AMD EPYC")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    summary = hardware.cpu_summary()
    assert summary == "AMD EPYC (avx2, avx512f, avx512_bf16; no amx_bf16; torch capped by ATEN_CPU_CAPABILITY=avx2)"


def test_native_bf16_names_the_flags_that_compute_it(cpu):
    cpu(AMX, "Sapphire Rapids")
    assert hardware.native_bf16("cpu") == (True, "cpu Sapphire Rapids: amx_bf16/avx512_bf16 computes bf16 natively")
    cpu(AVX512_BF16, "Zen 4")
    assert hardware.native_bf16("cpu") == (True, "cpu Zen 4: avx512_bf16 computes bf16 natively")


def test_native_bf16_says_when_a_cap_rather_than_the_cpu_rules_it_out(cpu, monkeypatch):
    cpu(AVX512_BF16, "Zen 4")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hardware.native_bf16("cpu") == (
        False,
        "cpu Zen 4: ONEDNN_MAX_CPU_ISA=AVX2 keeps torch off its bf16 instructions (bf16 would be emulated)",
    )


def test_native_bf16_of_a_cpu_without_bf16_names_the_missing_flags(cpu, monkeypatch):
    cpu(AVX512, "Skylake")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # a cap, but the CPU has no bf16 to take away
    assert hardware.native_bf16("cpu") == (
        False,
        "cpu Skylake: no amx_bf16/avx512_bf16 (bf16 would be emulated, several times slower)",
    )


def test_resolve_dtype_says_where_the_choice_came_from(cpu):
    cpu(AVX2, "AVX2 box")
    assert hardware.resolve_dtype("auto", "cpu") == ("float32", "auto: " + hardware.native_bf16("cpu")[1])
    assert hardware.resolve_dtype("bfloat16", "cpu") == ("bfloat16", "asked for (--dtype)")
