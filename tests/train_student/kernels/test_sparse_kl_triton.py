"""The fused Triton kernel (kd_loss(impl="fused")) under Triton's CPU interpreter.

TRITON_INTERPRET=1 is set before triton is imported, so this runs in CI without a GPU (and on a
GPU machine too, on CPU tensors). Shapes are tiny but span several tiles in every dimension, with
partial last tiles (the interpreter's tiles are 8 tokens x 32 vocab x 16 hidden, the forward
splits the vocabulary in 2). The reference is kd_loss(impl="naive") on float64 copies, itself
checked against the equations in test_loss.py. Inputs come from the `gen` fixture (tests/conftest.py):
a fixed seed by default, KD_TEST_SEED=random for a fresh one (printed), KD_TEST_SEED=<n> to replay
one, `make fuzz` for many. Floats are compared with tolerances that follow from their dtype (the
kernel computes in fp32, the reference in fp64); counts and argmaxes exactly, except at near-ties
that fp32 cannot order. Buffers the kernels write are poisoned with NaN first.
"""

from __future__ import annotations

import os

# Set before triton is imported (kernels are built interpreted at import), and restored afterwards
# so that other test modules in the same run (vLLM's workers inherit the environment) don't see it.
_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from train_student.kernels import sparse_kl_triton as sk  # noqa: E402
from train_student.loss import kd_loss  # noqa: E402

if type(sk._lse_forward_kernel).__name__ != "InterpretedFunction":
    # Something imported the kernels before TRITON_INTERPRET was set: rebuild them interpreted.
    sk = importlib.reload(sk)

if _PREVIOUS is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS

T, D, V = 13, 24, 100  # 2 token tiles, 2 hidden tiles, 4 vocab tiles (all with a partial last one)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(sk, "POISON_BUFFERS", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # kd_loss allows impl="fused" on CPU only then


def make_inputs(gen, *, k=4, t=T, dtype=torch.float32):
    hidden = torch.randn(t, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64) / math.sqrt(D) * 2
    teacher = torch.log_softmax(2 * torch.randn(t, V, generator=gen, dtype=torch.float64), -1)
    logprobs, ids = teacher.topk(k, dim=-1)
    if k > 1:
        ids[1, -1:] = -1  # mass-adaptive cache: fewer than K entries here
        logprobs[1, -1:] = -math.inf
    ids[2, :] = -1  # and none at all here
    logprobs[2, :] = -math.inf
    labels = torch.randint(0, V, (t,), generator=gen)
    labels[0] = -100
    labels[t - 4] = -100
    return hidden.to(dtype), weight.to(dtype), ids, logprobs.float(), labels


def rel_err(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp(min=1e-30))


def run(impl, inputs, dtype, **kw):
    hidden, weight, ids, logprobs, labels = inputs
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    loss, metrics = kd_loss(h, w, ids, logprobs, labels, impl=impl, **kw)
    gh, gw = torch.autograd.grad(loss, [h, w])  # fresh tensors: no accumulation into .grad
    return loss.detach(), gh, gw, metrics


def check_fused(inputs, tol, **kw):
    loss, gh, gw, metrics = run("fused", inputs, inputs[0].dtype, **kw)
    ref_loss, ref_gh, ref_gw, ref_metrics = run("naive", inputs, torch.float64, **kw)
    for x in (loss, gh, gw):
        assert torch.isfinite(x).all()
    assert abs(loss.item() - ref_loss.item()) <= tol * max(abs(ref_loss.item()), 1e-3)
    assert rel_err(gh, ref_gh) < tol
    assert rel_err(gw, ref_gw) < tol
    assert gh.dtype == inputs[0].dtype and gw.dtype == inputs[1].dtype
    for name in ("kd", "ce", "student_topk_mass", "teacher_tail_mass"):
        assert math.isclose(float(metrics[name]), float(ref_metrics[name]), rel_tol=tol, abs_tol=1e-6), name
    assert float(metrics["n_tokens"]) == float(ref_metrics["n_tokens"])
    return metrics


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.5)])
@pytest.mark.parametrize("k", [1, 4])
def test_fused_matches_reference(gen, kind, tail, temperature, ce_weight, k):
    check_fused(
        make_inputs(gen, k=k), 1e-4, kind=kind, tail=tail, temperature=temperature, ce_weight=ce_weight, kd_weight=0.8
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_matches_reference_on_sampled_targets(gen, temperature):
    """Sampled targets (issue 26): ids with log importance weights, used as they are (no tempering)."""
    from train_student.loss import sampled_log_weights

    hidden, weight, ids, logprobs, labels = make_inputs(gen, k=5)
    counts = torch.randint(1, 6, ids.shape, generator=gen).masked_fill(ids < 0, 0)
    estimator = "unbiased" if temperature == 1.0 else "self_normalized"
    log_w = sampled_log_weights(counts, logprobs, temperature=temperature, estimator=estimator).float()
    check_fused((hidden, weight, ids, log_w, labels), 1e-4, targets="sampled", temperature=temperature, ce_weight=0.5)


def test_fused_large_k(gen):
    """K = 64 > the vocab tile: the sparse part is not tied to the tiling."""
    check_fused(make_inputs(gen, k=64), 1e-4, kind="reverse_kl", tail="bucket", temperature=1.5)


def test_fused_ce_at_temperature_1(gen):
    """CE shares the temperature-1 log-sum-exp with KD: one coefficient in the backward."""
    check_fused(make_inputs(gen), 1e-4, kind="forward_kl", tail="bucket", ce_weight=1.0)


def test_fused_ce_only(gen):
    check_fused(make_inputs(gen), 1e-4, kd_weight=0.0, ce_weight=1.0, temperature=3.0)


def test_fused_bf16(gen):
    """bf16 inputs are loaded as bf16 and cast to fp32 in the kernel (interpreter: no bf16 math)."""
    check_fused(
        make_inputs(gen, dtype=torch.bfloat16), 1e-2, kind="forward_kl", tail="bucket", temperature=2.0, ce_weight=0.5
    )


# Logit gaps below this may be ordered differently by fp32 (the kernel) and fp64 (the reference).
FP32_TIE = 1e-4


def near_ties(hidden, weight) -> torch.Tensor:
    """[T] bool: positions whose two largest float64 logits are within FP32_TIE of each other."""
    logits = hidden.double() @ weight.double().T
    if logits.shape[1] < 2:
        return torch.zeros(logits.shape[0], dtype=torch.bool)
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]) < FP32_TIE


def test_fused_top1_agreement_matches_naive(gen):
    inputs = make_inputs(gen)
    *_, metrics = run("fused", inputs, torch.float32)
    *_, ref = run("naive", inputs, torch.float64)
    assert int(metrics["n_scored"]) == int(ref["n_scored"])
    ties = int(near_ties(inputs[0], inputs[1]).sum())
    assert abs(int(metrics["n_top1_agree"]) - int(ref["n_top1_agree"])) <= ties
    if ties == 0:  # then the ratio is the same ratio of the same counts, rounded once in fp32
        assert math.isclose(float(metrics["top1_agreement"]), float(ref["top1_agreement"]), rel_tol=2**-23)


def test_fused_all_masked(gen):
    hidden, weight, ids, logprobs, labels = make_inputs(gen)
    labels = torch.full_like(labels, -100)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, metrics = kd_loss(h, w, ids, logprobs, labels, impl="fused", ce_weight=1.0)
    assert loss.grad_fn is not None and loss.item() == 0.0
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))
    assert float(metrics["n_tokens"]) == 0.0


def test_fused_mostly_masked(gen):
    """A whole token tile with no trained position (its backward tiles are skipped) beside live ones."""
    hidden, weight, ids, logprobs, labels = make_inputs(gen)
    labels[:8] = -100
    check_fused((hidden, weight, ids, logprobs, labels), 1e-4, tail="bucket", ce_weight=0.5)


def test_lse_forward_kernel(gen):
    """The online log-sum-exp and argmax against torch, at shapes off the tile grid."""
    for t, v, d in ((1, 1, 1), (9, 33, 17), (T, V, D)):
        h = torch.randn(t, d, generator=gen)
        w = torch.randn(v, d, generator=gen)
        s = h.double() @ w.double().T
        lse_tau, lse_1, argmax = sk.lse_forward(h, w, 2.0, need_lse1=True)
        assert rel_err(lse_tau, torch.logsumexp(s / 2.0, -1)) < 1e-6
        assert rel_err(lse_1, torch.logsumexp(s, -1)) < 1e-6
        exact = argmax == s.argmax(-1)
        assert exact[~near_ties(h, w)].all()  # an fp32 near-tie may pick either of the two
        assert (s.gather(1, argmax[:, None])[:, 0] >= s.max(-1).values - FP32_TIE).all()


def test_dense_backward_kernel(gen):
    """dH = G W, dW = G^T H with G = a * softmax(s / tau) + b * softmax(s), against torch."""
    h = torch.randn(T, D, generator=gen)
    w = torch.randn(V, D, generator=gen)
    s = h.double() @ w.double().T
    a = torch.randn(T, generator=gen)
    b = torch.randn(T, generator=gen)
    lse_tau, lse_1 = torch.logsumexp(s / 2.0, -1).float(), torch.logsumexp(s, -1).float()
    g = a.double()[:, None] * torch.softmax(s / 2.0, -1) + b.double()[:, None] * torch.softmax(s, -1)
    dh, dw = sk.dense_backward(h, w, lse_tau, lse_1, a, b, 2.0, True, True)
    assert rel_err(dh, g @ w.double()) < 1e-5
    assert rel_err(dw, g.T @ h.double()) < 1e-5
    dh, dw = sk.dense_backward(h, w, lse_tau, None, a, None, 2.0, False, True)
    assert dh is None and rel_err(dw, (g - b.double()[:, None] * torch.softmax(s, -1)).T @ h.double()) < 1e-5


def test_sparse_kernels(gen):
    """The gather-dot and the sparse backward (duplicate ids in a row, zero coefficients)."""
    j = 7  # 2 id tiles of 4 in the interpreter, the last partial
    h = torch.randn(T, D, generator=gen)
    w = torch.randn(V, D, generator=gen)
    ids = torch.randint(0, V, (T, j), generator=gen)
    ids[:, -1] = ids[:, 0]  # e.g. the label is also a teacher id
    coef = torch.randn(T, j, generator=gen)
    coef[3] = 0.0
    ref = torch.einsum("td,tjd->tj", h.double(), w.double()[ids])
    assert rel_err(sk.gather_logits(h, w, ids), ref) < 1e-6

    dh0 = torch.randn(T, D, generator=gen)  # the dense kernel's result: added to, not overwritten
    dw0 = torch.randn(V, D, generator=gen)
    dh, dw = dh0.clone(), dw0.clone()
    sk.sparse_backward(h, w, ids, coef, dh, dw)
    ref_dh = dh0.double() + torch.einsum("tj,tjd->td", coef.double(), w.double()[ids])
    rows = (coef.double()[..., None] * h.double()[:, None]).reshape(-1, D)
    ref_dw = dw0.double().index_add(0, ids.reshape(-1), rows)
    assert rel_err(dh, ref_dh) < 1e-6
    assert rel_err(dw, ref_dw) < 1e-6
