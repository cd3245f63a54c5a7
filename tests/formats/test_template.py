"""formats.template: trained positions are exactly the assistant turns (content + end-of-turn)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from formats.template import ChatTemplater, TemplateReject
from formats.tokenizer_id import tokenizer_fingerprint


def assistant_runs(item):
    """The trained tokens grouped into runs of consecutive positions."""
    runs, prev = [], None
    for p in item.target_positions.tolist():
        if prev is None or p != prev + 1:
            runs.append([])
        runs[-1].append(int(item.input_ids[p]))
        prev = p
    return runs


def test_masks_decode_to_exactly_the_assistant_turns(tokenizer, sample_rows):
    templater = ChatTemplater(tokenizer, max_length=None)
    multi = [r for r in sample_rows if sum(m["role"] == "assistant" for m in r["messages"]) > 1]
    assert len(multi) >= 10
    for row in sample_rows:
        item = templater.score({**row, "source": row.get("source", "")})
        texts = [tokenizer.decode(run) for run in assistant_runs(item)]
        assert texts == [m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"]
        # and the whole sequence is the template's rendering
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert tokenizer.decode(item.input_ids) == full


def test_truncate_and_drop(tokenizer, sample_rows):
    row = max(sample_rows, key=lambda r: len(r["messages"][-1]["content"]))
    full = ChatTemplater(tokenizer).score(row)
    cut = ChatTemplater(tokenizer, max_length=200, length_policy="truncate").score(row)
    assert cut.truncated and len(cut.input_ids) == 200
    assert np.array_equal(cut.input_ids, full.input_ids[:200])
    assert np.array_equal(cut.target_positions, full.target_positions[full.target_positions < 200])
    with pytest.raises(TemplateReject, match="^too_long"):
        ChatTemplater(tokenizer, max_length=200, length_policy="drop").score(row)
    with pytest.raises(TemplateReject, match="^no_trained_tokens"):
        ChatTemplater(tokenizer, max_length=20, length_policy="truncate").score(row)


def test_other_templates(tokenizer):
    """A Llama-3-like template without trailing text, one without an end-of-turn token, and one that
    re-renders earlier turns (not incremental: rejected, not silently mis-masked)."""
    tok = copy.deepcopy(tokenizer)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "More"},
        {"role": "assistant", "content": "Sure thing."},
    ]
    record = {"id": "x", "messages": messages, "source": ""}
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}: {{ m.content }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
    )
    item = ChatTemplater(tok).score(record)
    assert [tok.decode(r) for r in assistant_runs(item)] == ["Hello!<|im_end|>", "Sure thing.<|im_end|>"]
    tok.chat_template = (
        "{% for m in messages %}### {{ m.role }}\n{{ m.content }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant\n{% endif %}"
    )
    item = ChatTemplater(tok).score(record)
    assert [tok.decode(r) for r in assistant_runs(item)] == ["Hello!", "Sure thing."]
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m.role }}: {{ m.content }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(TemplateReject, match="^template_not_incremental"):
        ChatTemplater(tok).score(record)
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    with pytest.raises(TemplateReject, match="^template_error: .*no tools"):
        ChatTemplater(tok).score({**record, "messages": [{"role": "tool", "content": "x"}] + messages})


def test_generate_prompt_and_fingerprint(tokenizer, sample_rows):
    row = next(r for r in sample_rows if len(r["messages"]) == 4)
    item = ChatTemplater(tokenizer).prompt(row)
    assert item.messages == row["messages"][:3] and len(item.target_positions) == 0
    assert tokenizer.decode(item.input_ids).endswith("<|im_start|>assistant\n")
    fp = tokenizer_fingerprint(tokenizer)
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<new_token>"])
    assert tokenizer_fingerprint(tok) != fp and tokenizer_fingerprint(copy.deepcopy(tokenizer)) == fp
