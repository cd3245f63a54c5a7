"""train_student.model: `load_student` (dtypes, attention, errors), `prune_layers` (which layers, in which
order, renumbered, what is written, refusals), `StudentLoss` (the loss on the LM head without logits),
`check_output_head` (what passes, the probe leaving the model as it was) and `prepare_student`, on tiny
random Llamas from kd_fixtures. tests/train_student/test_train.py covers the refused output-head extras
and a pruned student in a training run; test_data.py packing through StudentLoss."""

from __future__ import annotations

import logging

import pytest
import torch

from formats.errors import InputError
from train_student.loss_options import LossSpec
from train_student.model import check_output_head, load_student, prepare_student, prune_layers, StudentLoss

from .kd_fixtures import make_model, make_tokenizer, save_model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 3-layer teacher with its tokenizer (layers told apart by their weights)."""
    return save_model(make_model(seed=1, layers=3, scale=0.12), make_tokenizer(), tmp_path_factory.mktemp("t") / "t")


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir).eval()


IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 42, 7]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def same_layer(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- load_student --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, weights", [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("bf16-mixed", torch.float32)]
)
def test_load_student_keeps_float32_weights_for_mixed_precision(teacher_dir, dtype, weights):
    lm = load_student(str(teacher_dir), dtype=dtype)
    assert {p.dtype for p in lm.parameters()} == {weights}
    assert lm.config.num_hidden_layers == 3


def test_load_student_takes_the_attention_implementation(teacher_dir, teacher):
    eager = load_student(str(teacher_dir), attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    torch.testing.assert_close(logits(eager), logits(teacher), rtol=1e-5, atol=1e-5)  # same model either way


def test_load_student_of_a_missing_folder_is_an_input_error_naming_it(tmp_path):
    with pytest.raises(InputError, match=r"^cannot load the student '.*no-such-student'"):
        load_student(str(tmp_path / "no-such-student"))


def _tokenizer_only(path):
    make_tokenizer().save_pretrained(path)  # e.g. a copy whose config and weights did not arrive
    return str(path)


def _not_a_language_model(path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "make",
    [
        _tokenizer_only,
        _not_a_language_model,
    ],
)
def test_a_folder_that_holds_no_causal_lm_is_an_input_error_naming_it(tmp_path, make):
    path = make(tmp_path / "student")
    with pytest.raises(InputError, match=f"cannot load the student '{path}'"):
        load_student(path)


def test_a_student_that_cannot_be_fetched_is_one_line():
    with pytest.raises(InputError) as err:
        load_student("kdcache-test-org/no-such-student")
    assert "\n" not in str(err.value)


# ---- prune_layers ----------------------------------------------------------------------------------------


def test_prune_keeps_the_given_layers_in_the_given_order(teacher_dir, teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    out = prune_layers(str(teacher_dir), [2, 0], tmp_path / "pruned")
    assert out == tmp_path / "pruned"
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert same_layer(student.model.layers[0], teacher.model.layers[2])
    assert same_layer(student.model.layers[1], teacher.model.layers[0])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]  # renumbered for the KV cache
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert (out / "PRUNED_FROM.txt").read_text() == f"teacher: {teacher_dir}\nkeep_layers: [2, 0]\n"


def test_prune_keeping_every_layer_is_the_teacher(teacher_dir, teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(prune_layers(str(teacher_dir), [0, 1, 2], tmp_path / "all"))
    assert torch.equal(logits(student), logits(teacher))


def test_prune_copies_the_tokenizer(teacher_dir, tmp_path):
    from transformers import AutoTokenizer

    out = prune_layers(str(teacher_dir), [1], tmp_path / "p")
    assert AutoTokenizer.from_pretrained(out).get_vocab() == make_tokenizer().get_vocab()


def test_prune_without_a_tokenizer_warns_and_still_writes_the_student(tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    bare = tmp_path / "bare"
    make_model(seed=0, layers=2).save_pretrained(bare)  # weights only
    with caplog.at_level(logging.WARNING, logger="train_student"):
        out = prune_layers(str(bare), [1], tmp_path / "p")
    assert f"{bare} has no tokenizer to copy next to the pruned student" in caplog.text
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


def test_prune_keeps_the_layer_types_of_the_layers_kept(tmp_path):
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    )
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    out = prune_layers(str(tmp_path / "qwen"), [2, 0], tmp_path / "p")
    assert AutoConfig.from_pretrained(out).layer_types == ["sliding_attention", "full_attention"]


@pytest.mark.parametrize("keep", [[3], [-1], [0, 0], []])
def test_prune_refuses_bad_indices_naming_the_range_and_writes_nothing(teacher_dir, tmp_path, keep):
    with pytest.raises(InputError) as err:
        prune_layers(str(teacher_dir), keep, tmp_path / "p")
    assert str(err.value) == f"--keep-layers {keep}: need distinct indices in 0..2 (the teacher has 3 layers)"
    assert not (tmp_path / "p").exists()


def test_prune_refuses_a_model_without_a_layers_list(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(InputError) as err:
        prune_layers(str(tmp_path / "gpt2"), [0], tmp_path / "p")
    assert str(err.value) == f"{tmp_path / 'gpt2'}: cannot prune GPT2LMHeadModel: no `layers` list in its decoder"
    assert not (tmp_path / "p").exists()


# ---- StudentLoss -----------------------------------------------------------------------------------------


def batch(seq: int = 10, k: int = 4, vocab: int = 256, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (1, seq), generator=gen)
    position_ids = torch.arange(seq)[None]
    topk_ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(seq)])
    topk_logprobs = torch.log_softmax(torch.randn(seq, k, generator=gen), -1) - 0.1
    labels = torch.cat([input_ids[0, 1:], torch.tensor([-100])])
    labels[:3] = -100  # a prompt
    return input_ids, position_ids, topk_ids, topk_logprobs, labels


def test_student_loss_with_ce_alone_is_the_models_cross_entropy():
    lm = make_model(seed=3)
    input_ids, position_ids, topk_ids, topk_logprobs, labels = batch()
    loss, metrics = StudentLoss(lm)(
        input_ids, position_ids, topk_ids, topk_logprobs, labels, spec=LossSpec(kd_weight=0.0, ce_weight=1.0)
    )
    expected = torch.nn.functional.cross_entropy(lm(input_ids=input_ids).logits[0], labels, ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert int(metrics["n_tokens"]) == int((labels != -100).sum()) == 6


def test_student_loss_kd_matches_the_kl_on_the_models_own_logits():
    lm = make_model(seed=3).double()
    input_ids, position_ids, topk_ids, topk_logprobs, labels = batch()
    loss, _ = StudentLoss(lm)(
        input_ids, position_ids, topk_ids, topk_logprobs.double(), labels, spec=LossSpec(kd_weight=1.0)
    )
    logq = torch.log_softmax(lm(input_ids=input_ids).logits[0], -1)  # forward KL, teacher renormalized over its ids
    p = torch.softmax(topk_logprobs.double(), -1)
    kl = (p * (p.log() - logq.gather(1, topk_ids))).sum(-1)
    torch.testing.assert_close(loss, kl[labels != -100].mean(), rtol=1e-10, atol=1e-12)


def test_student_loss_gradients_reach_every_parameter():
    lm = make_model(seed=3)
    loss, _ = StudentLoss(lm)(*batch(), spec=LossSpec(kd_weight=1.0, ce_weight=0.5))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.parameters())


def test_student_loss_under_bf16_autocast_keeps_float32_weights_and_is_close():
    lm = make_model(seed=3, scale=0.12)
    args = batch()
    spec = LossSpec(kd_weight=1.0, ce_weight=0.5)
    full, _ = StudentLoss(lm)(*args, spec=spec)
    mixed, _ = StudentLoss(lm, autocast=torch.bfloat16)(*args, spec=spec)
    mixed.backward()
    assert mixed.dtype == torch.float32 and mixed.item() != full.item()  # the decoder really ran in bf16
    assert mixed.item() == pytest.approx(full.item(), rel=0.05)
    assert {p.grad.dtype for p in lm.parameters()} == {torch.float32}


def test_student_loss_under_bf16_autocast_casts_the_output_head_once_a_micro_batch():
    """The [V, D] head is cast to bf16 once (inside the loss, outside autograd) and its gradient comes back
    in float32 as accumulated: before, the head went fp32 -> bf16 in StudentLoss and its gradient
    fp32 -> bf16 -> fp32 on the way back (4 casts of [V, D] a micro-batch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    lm = make_model(seed=3, scale=0.12)
    head = tuple(lm.get_output_embeddings().weight.shape)
    casts = []

    class CountHeadCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == head:
                casts.append((args[0].dtype, (kwargs or {}).get("dtype")))
            return func(*args, **(kwargs or {}))

    with CountHeadCasts():
        loss, _ = StudentLoss(lm, autocast=torch.bfloat16)(*batch(), spec=LossSpec(kd_weight=1.0, ce_weight=0.5))
        loss.backward()
    assert casts == [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]  # the copy; dW per chunk
    assert lm.get_output_embeddings().weight.grad.dtype == torch.float32


# ---- check_output_head, prepare_student ------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("final_logit_softcapping", 0), ("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0)],
)
def test_output_head_settings_that_mean_none_pass(field, value):
    lm = make_model(seed=0)
    setattr(lm.config, field, value)
    assert check_output_head(lm, "student") is None


def test_the_probe_leaves_the_model_as_it_was():
    lm = make_model(seed=0)
    before = logits(lm)
    check_output_head(lm, "student")
    assert "forward" not in vars(lm.get_decoder())  # the stub is gone
    assert torch.equal(logits(lm), before)


def test_a_bfloat16_student_passes_the_probe():
    lm = make_model(seed=0).to(torch.bfloat16)
    assert check_output_head(lm, "student") is None


def test_a_forward_that_cannot_be_probed_warns_and_relies_on_the_config(caplog):
    class NeedsMore(torch.nn.Linear):
        def forward(self, x):
            raise RuntimeError("this head needs the decoder's attention mask")

    lm = make_model(seed=0)
    head = NeedsMore(64, 256, bias=False)
    head.weight = lm.lm_head.weight
    lm.lm_head = head
    with caplog.at_level(logging.WARNING, logger="train_student"):
        assert check_output_head(lm, "student") is None
    assert "could not probe the student's output head (RuntimeError: this head needs" in caplog.text
    assert "forward" not in vars(lm.get_decoder())


def test_a_model_without_an_lm_head_is_refused():
    lm = make_model(seed=0).model  # the bare decoder
    with pytest.raises(InputError) as err:
        check_output_head(lm, "enc")
    assert str(err.value) == "enc: LlamaModel has no output embeddings (LM head); need a causal LM"


@pytest.mark.parametrize("checkpointing", [True, False])
def test_prepare_student_turns_the_kv_cache_off_and_checkpointing_on_when_asked(checkpointing):
    lm = make_model(seed=0)
    lm.config.use_cache = True
    assert prepare_student(lm, gradient_checkpointing=checkpointing) is lm
    assert lm.config.use_cache is False and lm.is_gradient_checkpointing is checkpointing
