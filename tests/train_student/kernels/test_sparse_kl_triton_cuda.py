"""The fused Triton kernel on a real GPU (marker `gpu`: skipped where torch sees no CUDA device).

test_sparse_kl_triton.py checks the kernel at tiny shapes under Triton's CPU interpreter; this file
checks the compiled kernel at a student's real sizes (SmolLM2-135M's head: D=576, V=49152, K=64)
against impl="chunked" on the same GPU, in float32 and bfloat16, and that it holds less memory than
chunked. bench/kernel_gpu.sh measures the times; this file only asserts correctness and the memory
bound.
"""

from __future__ import annotations

import math

import pytest
import torch

from train_student.loss import kd_loss

pytestmark = pytest.mark.gpu

T, D, V, K = 2048, 576, 49152, 64


def make_inputs(dtype, *, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(T, D, generator=gen, device="cuda").to(dtype)
    weight = (torch.randn(V, D, generator=gen, device="cuda") / math.sqrt(D) * 2).to(dtype)
    teacher = torch.log_softmax(2 * torch.randn(T, V, generator=gen, device="cuda"), -1)
    logprobs, ids = teacher.topk(K, dim=-1)
    labels = torch.randint(0, V, (T,), generator=gen, device="cuda")
    labels[::7] = -100
    ids[3, K // 2 :], logprobs[3, K // 2 :] = -1, -math.inf  # a mass-adaptive position
    return hidden, weight, ids.int(), logprobs, labels


def run(impl, inputs, **kw):
    hidden, weight, ids, logprobs, labels = inputs
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, metrics = kd_loss(h, w, ids, logprobs, labels, impl=impl, **kw)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return loss.detach().double(), h.grad.double(), w.grad.double(), metrics, peak


@pytest.mark.parametrize(
    "kind, tail", [("forward_kl", "renormalize"), ("forward_kl", "bucket"), ("reverse_kl", "bucket")]
)
@pytest.mark.parametrize("temperature, ce_weight", [(1.0, 0.0), (2.0, 0.5)])
def test_fused_matches_chunked_float32(kind, tail, temperature, ce_weight):
    inputs = make_inputs(torch.float32)
    kw = dict(kind=kind, tail=tail, temperature=temperature, ce_weight=ce_weight)
    loss_c, dh_c, dw_c, m_c, _ = run("chunked", inputs, **kw)
    loss_f, dh_f, dw_f, m_f, _ = run("fused", inputs, **kw)
    assert torch.allclose(loss_f, loss_c, rtol=1e-4, atol=1e-6)
    for fused, chunked in ((dh_f, dh_c), (dw_f, dw_c)):
        assert (fused - chunked).abs().max() <= 1e-3 * chunked.abs().max() + 1e-7
    assert int(m_f["n_tokens"]) == int(m_c["n_tokens"]) and int(m_f["n_scored"]) == int(m_c["n_scored"])


def test_fused_bfloat16_close_to_chunked_and_smaller():
    inputs = make_inputs(torch.bfloat16)
    loss_c, dh_c, dw_c, _, peak_c = run("chunked", inputs, ce_weight=0.5)
    loss_f, dh_f, dw_f, _, peak_f = run("fused", inputs, ce_weight=0.5)
    assert torch.allclose(loss_f, loss_c, rtol=2e-2)
    for fused, chunked in ((dh_f, dh_c), (dw_f, dw_c)):
        cos = torch.nn.functional.cosine_similarity(fused.flatten(), chunked.flatten(), dim=0)
        assert cos > 0.999
    assert peak_f < peak_c, (peak_f, peak_c)


def test_fused_all_masked_is_zero_not_nan():
    hidden, weight, ids, logprobs, labels = make_inputs(torch.float32)
    loss, dh, dw, _, _ = run("fused", (hidden, weight, ids, logprobs, torch.full_like(labels, -100)))
    assert float(loss) == 0.0 and float(dh.abs().max()) == 0.0 and float(dw.abs().max()) == 0.0
