"""formats/tokenizer_id.py: the tokenizer identity both stages agree on. issue 9, item 10: the teacher's
output size (LM-head rows) can exceed the tokenizer's vocabulary; the teacher stage records it and the
writer range-checks ids and sizes id codes with it."""

from __future__ import annotations

import pytest

from formats.errors import InputError
from formats.tokenizer_id import load_tokenizer, model_output_size


def test_model_output_size_is_the_lm_head_rows(tmp_path):
    from transformers import LlamaConfig

    # a padded head: 1,024 output rows for a tokenizer of fewer tokens (as OLMo 2 and Qwen2.5 do)
    LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1
    ).save_pretrained(tmp_path / "teacher")
    assert model_output_size(str(tmp_path / "teacher")) == 1024


def test_unreadable_model_config_gives_no_output_size(tmp_path):
    (tmp_path / "teacher").mkdir()
    assert model_output_size(str(tmp_path / "teacher")) is None


def test_a_missing_tokenizer_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot load the tokenizer of .*nothing-here"):
        load_tokenizer(str(tmp_path / "nothing-here"))
