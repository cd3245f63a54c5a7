"""`load_engine(config)`: the teacher engine the config asks for (engines import base; base imports
neither engine)."""
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
