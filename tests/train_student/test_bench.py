"""train_student.bench's offline-vs-online part: the contenders time the same objective. With a cache that
holds the teacher's whole distribution (K = V), kdcache's sparse loss, the dense online KL and Liger's fused
JSD at beta 0 are one number, so the table compares step costs, not different losses."""

from __future__ import annotations

import math

import pytest
import torch

from train_student.bench import ONLINE_CONTENDERS, _liger_jsd, online_step
from train_student.data import PackedBatch
from train_student.loss_options import LossSpec

V = 96


def tiny_lm(layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models_and_batch():
    student, teacher = tiny_lm(1, seed=1), tiny_lm(2, seed=2)
    torch.manual_seed(3)
    s = 23  # two packed examples of odd lengths
    input_ids = torch.randint(0, V, (1, s))
    position_ids = torch.cat([torch.arange(10), torch.arange(s - 10)])[None]
    labels = torch.cat([input_ids[0, 1:], torch.tensor([-100])])
    labels[[0, 1, 9, 15]] = -100  # prompt positions and the first example's last token
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=input_ids, position_ids=position_ids).logits[0], -1)
    top = logp.topk(V, dim=-1)  # the whole distribution: what a K = V cache would hold
    ids = torch.where(labels[:, None] != -100, top.indices, -1)
    lps = torch.where(labels[:, None] != -100, top.values, -math.inf)
    batch = PackedBatch(input_ids, position_ids, labels, ids, lps.float(), n_examples=2)
    return student, teacher, batch


@pytest.mark.parametrize("name", ONLINE_CONTENDERS)
def test_every_contender_computes_the_offline_loss_on_a_full_distribution_cache(models_and_batch, name):
    student, teacher, batch = models_and_batch
    spec = LossSpec(kd_weight=1.0, ce_weight=0.5, chunk_size=8)
    liger = _liger_jsd(compiled=False)  # the same loss; compiling takes a minute here
    if name == ONLINE_CONTENDERS[2] and liger is None:
        pytest.skip("liger-kernel is not installed (an optional benchmark dependency)")
    offline = online_step(ONLINE_CONTENDERS[0], student, teacher, batch, spec)
    loss = online_step(name, student, teacher, batch, spec, liger)
    assert loss.ndim == 0 and loss.requires_grad
    assert loss.item() == pytest.approx(offline.item(), rel=1e-4)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is never trained
    student.zero_grad(set_to_none=True)
