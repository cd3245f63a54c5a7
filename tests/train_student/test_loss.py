"""kd_loss, impl="naive" and "chunked", against a float64 reference written out here.

The reference materializes the logits and spells each loss out per position, straight from
docs/KD_MATH.md, sharing no code with train_student.loss_torch.
Values and both gradients (hidden and LM head) are compared by relative norm error. Inputs are
random from the `gen` fixture (tests/conftest.py): a fixed seed by default, KD_TEST_SEED=random for a
fresh one (printed; pytest shows it on failure), KD_TEST_SEED=<n> to replay one, `make fuzz` for many.
Floats are compared with tolerances that follow from their dtype, counts exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from train_student.loss import kd_loss
from train_student.loss_torch import TAIL_EPS

KINDS = ("forward_kl", "reverse_kl")
TAILS = ("renormalize", "bucket")
IMPLS = ("naive", "chunked")


# ----------------------------------------------------------------------------- reference


def reference_loss(
    hidden, weight, topk_ids, topk_logprobs, labels, *, kind, tail, temperature=1.0, kd_weight=1.0, ce_weight=0.0
):
    """The loss in float64, one position at a time, from the equations."""
    tau = float(temperature)
    s = hidden.double() @ weight.double().T
    log_q = torch.log_softmax(s / tau, dim=-1)
    log_q1 = torch.log_softmax(s, dim=-1)
    total = s.new_zeros(())
    n = 0
    for t in range(s.shape[0]):
        if int(labels[t]) == -100:
            continue
        n += 1
        keep = [
            k for k in range(topk_ids.shape[1]) if int(topk_ids[t, k]) >= 0 and float(topk_logprobs[t, k]) > -math.inf
        ]
        ids = topk_ids[t, keep].long()
        lp = topk_logprobs[t, keep].double()
        p_raw_tail = 1.0 - float(lp.exp().sum())
        p_raw_tail = 0.0 if p_raw_tail < TAIL_EPS else p_raw_tail  # rounding-level tails are 0
        if tail == "renormalize":
            p_hat = torch.softmax(lp / tau, dim=0)
            p_tail = 0.0
        else:
            w = (lp / tau).exp()
            w_tail = p_raw_tail ** (1.0 / tau)
            den = w.sum() + w_tail
            p_hat, p_tail = w / den, float(w_tail / den)
        lq = log_q[t, ids]
        r = torch.clamp(1.0 - lq.exp().sum(), min=TAIL_EPS)
        if not keep and tail == "renormalize":
            kd = s.new_zeros(())
        elif kind == "forward_kl":
            kd = (p_hat * (p_hat.log() - lq)).sum()
            if p_tail > 0:
                kd = kd + p_tail * (math.log(p_tail) - r.log())
        elif tail == "bucket":
            q = lq.exp()
            kd = (q * (lq - p_hat.log())).sum() + r * (r.log() - math.log(max(p_tail, TAIL_EPS)))
        else:
            lq_t = torch.log_softmax(s[t, ids] / tau, dim=0)
            kd = (lq_t.exp() * (lq_t - p_hat.log())).sum()
        ce = -log_q1[t, int(labels[t])]
        total = total + kd_weight * tau * tau * kd + ce_weight * ce
    return total / max(n, 1)


# ----------------------------------------------------------------------------- inputs


def make_inputs(
    gen, *, t=12, d=16, v=37, k=5, dtype=torch.float32, pad=True, mask=True, teacher_scale=1.0, teacher_full=False
):
    """Random student and a teacher cache with padding (-1 / -inf) and masked positions."""
    hidden = torch.randn(t, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) / math.sqrt(d) * 2
    teacher = torch.log_softmax(teacher_scale * 2 * torch.randn(t, v, generator=gen, dtype=torch.float64), -1)
    logprobs, ids = teacher.topk(v if teacher_full else k, dim=-1)
    if pad and ids.shape[1] > 1:
        ids[1, -1:] = -1  # a mass-adaptive cache: fewer entries at some positions
        logprobs[1, -1:] = -math.inf
        ids[2, 1:] = -1
        logprobs[2, 1:] = -math.inf
        ids[3, :] = -1  # no teacher entry at all
        logprobs[3, :] = -math.inf
    labels = torch.randint(0, v, (t,), generator=gen)
    if mask:
        labels[0] = -100
        labels[t // 2] = -100
    return (hidden.to(dtype), weight.to(dtype), ids, logprobs.float(), labels)


def rel_err(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp(min=1e-30))


def check_against_reference(inputs, impl, tol, **kw):
    hidden, weight, ids, logprobs, labels = inputs
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, metrics = kd_loss(h, w, ids, logprobs, labels, impl=impl, chunk_size=5, **kw)
    assert torch.isfinite(loss)
    gh, gw = torch.autograd.grad(loss, [h, w])

    hr = hidden.double().requires_grad_()
    wr = weight.double().requires_grad_()
    ref = reference_loss(hr, wr, ids, logprobs, labels, **kw)
    rh, rw = torch.autograd.grad(ref, [hr, wr])
    value, expected = loss.item(), ref.item()
    assert abs(value - expected) <= tol * max(abs(expected), 1e-3), (value, expected)
    assert rel_err(gh, rh) < tol
    assert rel_err(gw, rw) < tol
    return loss, metrics


# ----------------------------------------------------------------------------- value and gradients


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.5), (2.0, 0.5)])
def test_matches_reference(gen, impl, kind, tail, temperature, ce_weight):
    check_against_reference(
        make_inputs(gen), impl, 1e-4, kind=kind, tail=tail, temperature=temperature, ce_weight=ce_weight, kd_weight=0.7
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_float64_inputs_are_exact(gen, impl, kind, tail):
    check_against_reference(
        make_inputs(gen, dtype=torch.float64), impl, 1e-10, kind=kind, tail=tail, temperature=1.5, ce_weight=0.3
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_k1(gen, impl, kind, tail):
    check_against_reference(make_inputs(gen, k=1), impl, 1e-4, kind=kind, tail=tail, temperature=2.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_zero_teacher_tail(gen, impl, kind, tail):
    """K = V: the cached top-k holds all the teacher's mass (P = 0 contributes 0)."""
    inputs = make_inputs(gen, v=8, pad=False, teacher_full=True)
    check_against_reference(inputs, impl, 1e-4, kind=kind, tail=tail, temperature=1.0, ce_weight=0.2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_peaked_teacher(gen, impl, kind, tail):
    """Top-1 logprob ~ 0, the rest ~ -100: P underflows, p_hat is one-hot to fp32 precision."""
    inputs = make_inputs(gen, teacher_scale=50.0)
    check_against_reference(inputs, impl, 1e-4, kind=kind, tail=tail, temperature=2.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs(gen, impl):
    inputs = make_inputs(gen, dtype=torch.bfloat16)
    check_against_reference(inputs, impl, 2e-2, kind="forward_kl", tail="bucket", ce_weight=0.5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_all_masked_batch(gen, impl, kind, tail):
    hidden, weight, ids, logprobs, labels = make_inputs(gen)
    labels = torch.full_like(labels, -100)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, metrics = kd_loss(h, w, ids, logprobs, labels, impl=impl, kind=kind, tail=tail, ce_weight=1.0)
    assert loss.grad_fn is not None
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    assert float(metrics["n_tokens"]) == 0
    assert all(math.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize("chunk_size", [1, 4, 12, 1000])
def test_chunk_size_does_not_change_the_result(gen, chunk_size):
    hidden, weight, ids, logprobs, labels = make_inputs(gen, dtype=torch.float64)
    results = []
    for impl, cs in (("naive", 1024), ("chunked", chunk_size)):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        loss, _ = kd_loss(
            h, w, ids, logprobs, labels, impl=impl, chunk_size=cs, tail="bucket", temperature=2.0, ce_weight=0.5
        )
        results.append((loss, *torch.autograd.grad(loss, [h, w])))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-12


def test_chunked_gradcheck(gen):
    """The custom backward against finite differences (float64, tiny)."""
    hidden, weight, ids, logprobs, labels = make_inputs(gen, t=6, d=4, v=7, k=3, dtype=torch.float64)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    for kind in KINDS:

        def f(h, w):
            return kd_loss(
                h,
                w,
                ids,
                logprobs,
                labels,
                impl="chunked",
                chunk_size=4,
                kind=kind,
                tail="bucket",
                temperature=1.5,
                ce_weight=0.3,
            )[0]

        assert torch.autograd.gradcheck(f, (h, w))


def test_frozen_lm_head(gen):
    hidden, weight, ids, logprobs, labels = make_inputs(gen)
    h = hidden.clone().requires_grad_()
    loss, _ = kd_loss(h, weight, ids, logprobs, labels, impl="chunked")
    (gh,) = torch.autograd.grad(loss, [h])
    h2 = hidden.clone().requires_grad_()
    ref, _ = kd_loss(h2, weight, ids, logprobs, labels, impl="naive")
    (rh,) = torch.autograd.grad(ref, [h2])
    assert rel_err(gh, rh) < 1e-5


# ----------------------------------------------------------------------------- meaning


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail,full", [("renormalize", True), ("bucket", True), ("bucket", False)])
def test_identical_distributions_give_zero(gen, impl, kind, tail, full):
    """A teacher cache taken from the student itself: KL ~ 0 (with the bucket even for K < V)."""
    hidden, weight, _, _, labels = make_inputs(gen, dtype=torch.float64)
    student = torch.log_softmax(hidden @ weight.T, dim=-1)
    logprobs, ids = student.topk(student.shape[1] if full else 5, dim=-1)
    loss, metrics = kd_loss(hidden, weight, ids, logprobs, labels, impl=impl, kind=kind, tail=tail)
    assert abs(float(loss)) < 1e-6
    assert int(metrics["n_top1_agree"]) == int(metrics["n_scored"]) == int((labels != -100).sum())


def test_metrics(gen):
    hidden, weight, ids, logprobs, labels = make_inputs(gen, dtype=torch.float64)
    trained = labels != -100
    s = hidden @ weight.T
    q = torch.softmax(s / 2.0, dim=-1)
    valid = ids >= 0
    q_mass = (q.gather(1, ids.clamp(min=0)) * valid).sum(-1)
    tail = 1 - (logprobs.double().exp() * valid).sum(-1)
    tail = torch.where(tail < TAIL_EPS, 0.0, tail)
    agree = (s.argmax(-1) == ids[:, 0]) & valid[:, 0]
    for impl in IMPLS:
        _, m = kd_loss(hidden, weight, ids, logprobs, labels, impl=impl, temperature=2.0)
        assert float(m["n_tokens"]) == int(trained.sum())
        assert math.isclose(float(m["student_topk_mass"]), float(q_mass[trained].mean()), rel_tol=1e-9)
        assert math.isclose(float(m["teacher_tail_mass"]), float(tail[trained].mean()), rel_tol=1e-6)
        scored = trained & valid[:, 0]
        assert (int(m["n_top1_agree"]), int(m["n_scored"])) == (int(agree[scored].sum()), int(scored.sum()))
        assert math.isclose(float(m["top1_agreement"]), int(agree[scored].sum()) / int(scored.sum()))
        assert math.isclose(
            float(m["ce"]), float(-torch.log_softmax(s, -1)[trained, labels[trained]].mean()), rel_tol=1e-9
        )
        assert all(not (isinstance(v, torch.Tensor) and v.requires_grad) for v in m.values())


# ----------------------------------------------------------------------------- input checks


def _good(gen):
    return make_inputs(gen, t=4, d=3, v=6, k=2)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a, kw: a.__setitem__(0, a[0][0]), r"hidden must be \[T, D\]"),
        (lambda a, kw: a.__setitem__(1, a[1][:, :2]), r"lm_head_weight must be \[V, D\] with D = 3"),
        (lambda a, kw: a.__setitem__(2, a[2][:3]), r"topk_ids must be \[T, K\] with T = 4"),
        (lambda a, kw: a.__setitem__(3, a[3][:, :1]), r"topk_logprobs must have topk_ids' shape"),
        (lambda a, kw: a.__setitem__(4, a[4][:2]), r"labels must be \[T\] with T = 4"),
        (lambda a, kw: a.__setitem__(0, a[0].long()), r"hidden must be one of"),
        (lambda a, kw: a.__setitem__(1, a[1].double()), r"lm_head_weight dtype torch.float64 differs"),
        (lambda a, kw: a.__setitem__(2, a[2].float()), r"topk_ids must be an integer tensor"),
        (lambda a, kw: a.__setitem__(3, a[3].long()), r"topk_logprobs must be a float tensor"),
        (lambda a, kw: a.__setitem__(4, a[4].float()), r"labels must be int64"),
        (lambda a, kw: kw.update(kind="jsd"), r"kind must be one of"),
        (lambda a, kw: kw.update(tail="drop"), r"tail must be one of"),
        (lambda a, kw: kw.update(impl="cuda"), r"impl must be one of"),
        (lambda a, kw: kw.update(temperature=0.0), r"temperature must be a finite number > 0"),
        (lambda a, kw: kw.update(kd_weight=-1.0), r"kd_weight must be a finite number >= 0"),
        (lambda a, kw: kw.update(ce_weight=float("nan")), r"ce_weight must be a finite number >= 0"),
        (lambda a, kw: kw.update(chunk_size=0), r"chunk_size must be a positive int"),
        (
            lambda a, kw: (a.__setitem__(0, a[0].double()), a.__setitem__(1, a[1].double()), kw.update(impl="fused")),
            r"impl='fused' supports",
        ),
    ],
)
def test_input_validation(gen, mutate, match):
    args, kw = list(_good(gen)), {}
    mutate(args, kw)
    with pytest.raises(ValueError, match=match):
        kd_loss(*args, **kw)


def test_fused_without_cuda_says_so(gen, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU.*impl='chunked'"):
        kd_loss(*_good(gen), impl="fused")


# ---- the chunked path takes its gradients in the forward pass (issue 25) -------------------------------
def test_chunked_accumulates_scaled_backwards_and_frozen_inputs(gen):
    """Backward only scales the gradients stored in the forward: two scaled backwards of two calls
    accumulate as naive's do; a frozen head (LoRA) gets no gradient and the hidden states still do."""
    hidden, weight, ids, logprobs, labels = make_inputs(gen, t=13, d=8, v=29, k=4, dtype=torch.float64)
    grads = {}
    for impl in ("naive", "chunked"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        for scale, rows in ((0.3, slice(0, 7)), (1.7, slice(7, 13))):
            loss, _ = kd_loss(
                h[rows],
                w,
                ids[rows],
                logprobs[rows],
                labels[rows],
                impl=impl,
                chunk_size=3,
                temperature=2.0,
                ce_weight=0.4,
            )
            (loss * scale).backward()
        grads[impl] = (h.grad, w.grad)
    for a, b in zip(grads["chunked"], grads["naive"]):
        assert rel_err(a, b) < 1e-12
    h = hidden.clone().requires_grad_()
    loss, _ = kd_loss(h, weight, ids, logprobs, labels, impl="chunked", chunk_size=5)
    loss.backward()
    ref_h = hidden.clone().requires_grad_()
    ref, _ = kd_loss(ref_h, weight, ids, logprobs, labels, impl="naive")
    ref.backward()
    assert rel_err(h.grad, ref_h.grad) < 1e-12 and rel_err(loss, ref) < 1e-12


def test_chunked_under_no_grad_is_the_same_value_and_builds_no_graph(gen):
    inputs = make_inputs(gen, t=11, d=8, v=23, k=4, dtype=torch.float64)
    h, w = inputs[0].clone().requires_grad_(), inputs[1].clone().requires_grad_()
    with torch.no_grad():
        loss, metrics = kd_loss(h, w, *inputs[2:], impl="chunked", chunk_size=4, tail="bucket", temperature=1.5)
    ref, ref_metrics = kd_loss(*inputs, impl="naive", tail="bucket", temperature=1.5)
    assert loss.grad_fn is None and rel_err(loss, ref) < 1e-12
    for key in ("kd", "ce", "top1_agreement", "student_topk_mass", "n_tokens", "n_scored", "n_top1_agree"):
        assert rel_err(metrics[key], ref_metrics[key]) < 1e-12 or float(metrics[key]) == float(ref_metrics[key]), key


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_float32_head_beside_bf16_hidden_is_mixed_precision(temperature):
    """kd_loss(bf16 hidden, fp32 head): chunked computes in bf16 like a bf16 head and returns the head's
    gradient in float32 as accumulated over chunks (not rounded to bf16 and back); naive casts the head."""
    torch.manual_seed(0)
    t, d, v, k = 37, 24, 300, 5
    h = (torch.randn(t, d) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(v, d) * 0.2).requires_grad_()
    ids = torch.stack([torch.randperm(v)[:k] for _ in range(t)])
    lps = torch.log_softmax(torch.randn(t, k) * 2, -1).sort(-1, descending=True).values
    labels = torch.randint(0, v, (t,))
    kw = dict(kd_weight=1.0, ce_weight=0.5, temperature=temperature, chunk_size=8)
    mixed, _ = kd_loss(h, w, ids, lps, labels, impl="chunked", **kw)
    mixed.backward()
    dh_mixed, dw_mixed = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    halved, _ = kd_loss(h, w.bfloat16(), ids, lps, labels, impl="chunked", **kw)  # the old way: a bf16 head
    halved.backward()
    naive, _ = kd_loss(h.detach(), w, ids, lps, labels, impl="naive", **kw)
    assert dw_mixed.dtype == torch.float32 and dh_mixed.dtype == torch.bfloat16
    assert mixed.item() == halved.item()  # the same bf16 matmuls
    torch.testing.assert_close(dh_mixed, h.grad)
    torch.testing.assert_close(mixed, naive.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw_mixed, w.grad, rtol=2e-2, atol=1e-3)  # the same, less one bf16 round trip
