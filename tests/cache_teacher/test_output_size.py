"""issue 9, item 10: the teacher stage records the teacher's output size (LM-head rows), which can
exceed the tokenizer's vocabulary, and the writer range-checks ids and sizes id codes with it."""
from __future__ import annotations

from cache_teacher.run import engine_info, model_output_size

from teacher_helpers import make_config


def test_teacher_output_size_is_the_lm_head_rows(tmp_path):
    from transformers import LlamaConfig

    # a padded head: 1,024 output rows for a tokenizer of fewer tokens (as OLMo 2 and Qwen2.5 do)
    LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=1).save_pretrained(tmp_path / "teacher")
    config = make_config(teacher=str(tmp_path / "teacher"), out=str(tmp_path / "out"))
    assert model_output_size(config) == 1024
    assert engine_info(config)["output_size"] == 1024


def test_unreadable_teacher_config_gives_no_output_size(tmp_path):
    (tmp_path / "teacher").mkdir()
    assert model_output_size(make_config(teacher=str(tmp_path / "teacher"), out=str(tmp_path / "out"))) is None
