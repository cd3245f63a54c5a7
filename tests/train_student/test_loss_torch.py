"""train_student.loss_torch, function by function: `build_spec` (the teacher side: validity, temperature,
tail bucket, TAIL_EPS, gathered ids), `position_terms` and `summarize` on hand-computed numbers,
`make_terms_fn`'s coefficients against autograd on the raw logits, and `naive` / `chunked` called directly
(partial last chunks, grad_loss scaling, a frozen hidden state, no_grad, bf16, an empty batch).
tests/train_student/test_loss.py checks kd_loss (both impls) against a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from train_student.loss_torch import (
    TAIL_EPS,
    accumulation_dtype,
    build_spec,
    chunked,
    make_terms_fn,
    naive,
    position_terms,
    summarize,
)

INF = math.inf


def spec_of(
    ids,
    logprobs,
    labels,
    *,
    kind="forward_kl",
    tail="renormalize",
    temperature=1.0,
    kd=1.0,
    ce=0.0,
    dtype=torch.float64,
):
    return build_spec(
        torch.as_tensor(ids),
        torch.as_tensor(logprobs, dtype=torch.float64),
        torch.as_tensor(labels),
        kind=kind,
        tail=tail,
        temperature=temperature,
        kd_weight=kd,
        ce_weight=ce,
        dtype=dtype,
    )


def inputs(gen, t=7, d=6, v=11, k=3, dtype=torch.float64):
    """A student (hidden, head) and a teacher top-k with a padded entry, a row without entries and a prompt."""
    hidden = torch.randn(t, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) / math.sqrt(d) * 2
    teacher = torch.log_softmax(2 * torch.randn(t, v, generator=gen, dtype=torch.float64), -1)
    logprobs, ids = teacher.topk(k, dim=-1)
    ids[1, -1], logprobs[1, -1] = -1, -INF
    ids[2, :], logprobs[2, :] = -1, -INF
    labels = torch.randint(0, v, (t,), generator=gen)
    labels[0] = -100
    return hidden.to(dtype), weight.to(dtype), ids, logprobs.float(), labels


# ---- accumulation_dtype, build_spec ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, acc",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_accumulation_dtype(dtype, acc):
    assert accumulation_dtype(dtype) == acc


def test_build_spec_marks_padding_and_rows_without_a_teacher():
    s = spec_of(
        [[4, 2, -1], [-1, -1, -1], [7, 1, 0]], [[-0.5, -1.5, -INF], [-INF] * 3, [-0.1, -3.0, -INF]], [3, -100, 5]
    )
    assert s.valid.tolist() == [[True, True, False], [False, False, False], [True, True, False]]  # -1 id or -inf
    assert s.has_teacher.tolist() == [True, False, True]
    assert s.teacher_top1.tolist() == [4, -1, 7]
    assert s.trained.tolist() == [True, False, True] and int(s.n_tokens) == 2
    # the teacher's ids with padding at 0, then the label (ignored positions at 0): what every impl gathers
    assert s.sparse_ids.dtype == torch.int64
    assert s.sparse_ids.tolist() == [[4, 2, 0, 3], [0, 0, 0, 0], [7, 1, 0, 5]]
    assert torch.equal(s.teacher_logp[1], torch.zeros(3, dtype=torch.float64))  # no NaN from an empty row


def test_build_spec_renormalizes_the_teacher_at_the_temperature():
    logp = [math.log(0.5), math.log(0.3), -INF]
    s = spec_of([[1, 2, -1]], [logp], [1], temperature=2.0)
    w = torch.tensor([0.5**0.5, 0.3**0.5], dtype=torch.float64)
    torch.testing.assert_close(s.teacher_logp[0, :2].exp(), w / w.sum())
    assert s.teacher_logp[0, 2].item() == 0.0  # 0 where not valid
    assert s.teacher_log_tail is None and s.need_lse1 and not spec_of([[1]], [[0.0]], [1]).need_lse1
    torch.testing.assert_close(s.teacher_tail_raw, torch.tensor([0.2], dtype=torch.float64))


def test_build_spec_bucket_gives_the_tail_its_tempered_weight():
    s = spec_of([[1, 2]], [[math.log(0.5), math.log(0.3)]], [1], tail="bucket", temperature=2.0)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64) ** 0.5  # the tail P = 0.2 as one more bucket
    torch.testing.assert_close(s.teacher_logp[0].exp(), w[:2] / w.sum())
    torch.testing.assert_close(s.teacher_log_tail.exp(), w[2:] / w.sum())


def test_a_tail_below_tail_eps_is_zero():
    almost = math.log(1 - TAIL_EPS / 10)
    s = spec_of([[1, 2]], [[almost, -30.0]], [1], tail="bucket")
    assert s.teacher_tail_raw.tolist() == [0.0]
    assert s.teacher_log_tail.tolist() == [-INF]  # log 0: the bucket has no weight
    torch.testing.assert_close(s.teacher_logp[0].exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_build_spec_returns_the_accumulation_dtype_but_computes_in_float64():
    """The tail P = 1 - sum exp(l) of float64 logprobs comes out exact in a float32 spec (cast at the end)."""
    p = [0.6, 0.4 - 1e-5]
    s = spec_of([[1, 2]], [[math.log(x) for x in p]], [1], tail="bucket", dtype=torch.float32)
    assert s.teacher_logp.dtype == s.teacher_tail_raw.dtype == s.teacher_log_tail.dtype == torch.float32
    assert s.teacher_tail_raw.item() == pytest.approx(1e-5, rel=1e-5)


# ---- position_terms, summarize ------------------------------------------------------------------------------


def test_position_terms_forward_kl_and_ce_by_hand():
    # vocabulary of 3, one position: student logits s, teacher on ids {0, 1}, label 2
    s = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    spec = spec_of([[0, 1]], [[math.log(0.6), math.log(0.3)]], [2], kd=0.5, ce=2.0)
    lse = torch.logsumexp(s, -1)
    loss, kd, ce, log_q_mass = position_terms(spec, lse, None, s.gather(1, spec.sparse_ids))
    q = torch.softmax(s[0], -1)
    p = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)  # 0.6 and 0.3, renormalized
    expected_kd = float((p * (p.log() - q[:2].log())).sum())
    assert kd.item() == pytest.approx(expected_kd, rel=1e-12)
    assert ce.item() == pytest.approx(-math.log(q[2].item()), rel=1e-12)
    assert log_q_mass.item() == pytest.approx(math.log(q[0].item() + q[1].item()), rel=1e-12)
    assert loss.item() == pytest.approx(0.5 * expected_kd + 2.0 * ce.item(), rel=1e-12)


def test_position_terms_scales_kd_by_tau_squared_and_ce_uses_temperature_one():
    s = torch.tensor([[2.0, 0.5, -1.0, 0.0]], dtype=torch.float64)
    spec = spec_of([[1, 0]], [[math.log(0.7), math.log(0.2)]], [3], temperature=2.0, kd=1.0, ce=1.0)
    sparse = s.gather(1, spec.sparse_ids)
    loss, kd, ce, _ = position_terms(spec, torch.logsumexp(s / 2, -1), torch.logsumexp(s, -1), sparse)
    assert ce.item() == pytest.approx(-torch.log_softmax(s[0], -1)[3].item(), rel=1e-12)
    assert loss.item() == pytest.approx(4.0 * kd.item() + ce.item(), rel=1e-12)


def test_position_terms_averages_over_trained_positions_only():
    s = torch.tensor([[3.0, -3.0], [-3.0, 3.0]], dtype=torch.float64)
    trained = spec_of([[1], [1]], [[0.0], [0.0]], [1, -100])  # the untrained row has the same (good) KD
    loss, kd, _, _ = position_terms(trained, torch.logsumexp(s, -1), None, s.gather(1, trained.sparse_ids))
    assert loss.item() == pytest.approx(kd[0].item(), rel=1e-12)  # divided by 1 trained position, not 2
    none = spec_of([[1], [1]], [[0.0], [0.0]], [-100, -100])
    loss, *_ = position_terms(none, torch.logsumexp(s, -1), None, s.gather(1, none.sparse_ids))
    assert loss.item() == 0.0


def test_summarize_counts_agreement_over_trained_positions_with_a_teacher():
    spec = spec_of(
        [[1, 0], [-1, -1], [0, 1], [1, 0]], [[-0.1, -3.0], [-INF, -INF], [-0.1, -3.0], [-0.1, -3.0]], [1, 1, 0, -100]
    )
    kd = torch.tensor([1.0, 5.0, 3.0, 100.0], dtype=torch.float64, requires_grad=True)
    ce = torch.tensor([2.0, 2.0, 4.0, 100.0], dtype=torch.float64)
    argmax = torch.tensor([1, 1, 1, 1])  # agrees on row 0 (and on row 3, which is not trained)
    m = summarize(spec, kd, ce, torch.log(torch.full((4,), 0.5, dtype=torch.float64)), argmax)
    assert (int(m["n_top1_agree"]), int(m["n_scored"]), int(m["n_tokens"])) == (1, 2, 3)
    assert m["top1_agreement"].item() == 0.5
    assert m["kd"].item() == pytest.approx(3.0) and m["ce"].item() == pytest.approx(8 / 3)
    assert m["student_topk_mass"].item() == pytest.approx(0.5)
    assert not any(v.requires_grad for v in m.values())


# ---- make_terms_fn -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, ce", [(1.0, 0.0), (2.0, 0.5)])
@pytest.mark.parametrize(
    "kind, tail", [("forward_kl", "renormalize"), ("forward_kl", "bucket"), ("reverse_kl", "bucket")]
)
def test_terms_coefficients_give_the_gradient_on_the_raw_logits(gen, temperature, ce, kind, tail):
    """dL/ds_v = coef_tau softmax(s/tau)_v + coef_1 softmax(s)_v + sum_j coef_sparse_j [v = id_j]."""
    hidden, weight, ids, logprobs, labels = inputs(gen)
    spec = spec_of(ids, logprobs, labels, kind=kind, tail=tail, temperature=temperature, ce=ce)
    s = (hidden @ weight.T).requires_grad_()
    lse_1 = torch.logsumexp(s, -1) if spec.need_lse1 else None
    ref, *_ = position_terms(spec, torch.logsumexp(s / temperature, -1), lse_1, s.gather(1, spec.sparse_ids))
    (ds,) = torch.autograd.grad(ref, [s])

    metrics: dict = {}
    s = s.detach()
    loss, coef_tau, coef_1, coef_sparse = make_terms_fn(spec, metrics)(
        torch.logsumexp(s / temperature, -1),
        torch.logsumexp(s, -1) if spec.need_lse1 else None,
        s.gather(1, spec.sparse_ids),
        s.argmax(-1),
    )
    grad = coef_tau[:, None] * torch.softmax(s / temperature, -1)
    if temperature != 1.0:
        grad = grad + coef_1[:, None] * torch.softmax(s, -1)
    else:
        assert coef_1 is None
    grad = grad.scatter_add(1, spec.sparse_ids, coef_sparse)
    torch.testing.assert_close(grad, ds, rtol=1e-10, atol=1e-12)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12) and not loss.requires_grad
    assert int(metrics["n_tokens"]) == int((labels != -100).sum())  # the metrics are filled on the way


# ---- naive and chunked, called directly ---------------------------------------------------------------------


def loss_and_grads(fn, hidden, weight, spec, scale=1.0, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = fn(h, w, spec, **kw)
    (scale * loss).backward()
    return loss.detach(), h.grad, w.grad, metrics


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 6, 7, 8])  # 7 rows: partial last chunks, one chunk, more than T
def test_chunked_equals_naive_at_every_chunk_boundary(gen, chunk_size):
    hidden, weight, ids, logprobs, labels = inputs(gen)
    spec = spec_of(ids, logprobs, labels, tail="bucket", temperature=1.5, ce=0.3)
    ref = loss_and_grads(naive, hidden, weight, spec)
    got = loss_and_grads(chunked, hidden, weight, spec, chunk_size=chunk_size)
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-13)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-11, atol=1e-13)
    for key in ("n_top1_agree", "n_scored", "n_tokens"):  # argmax assembled across chunks
        assert int(got[3][key]) == int(ref[3][key]), key
    for key in ("kd", "ce", "student_topk_mass", "teacher_tail_mass", "top1_agreement"):
        assert got[3][key].item() == pytest.approx(ref[3][key].item(), rel=1e-12), key


def test_chunked_backward_scales_with_the_incoming_gradient(gen):
    hidden, weight, ids, logprobs, labels = inputs(gen)
    spec = spec_of(ids, logprobs, labels, ce=0.5)
    _, h1, w1, _ = loss_and_grads(chunked, hidden, weight, spec, chunk_size=3)
    _, h3, w3, _ = loss_and_grads(chunked, hidden, weight, spec, scale=-3.0, chunk_size=3)
    torch.testing.assert_close(h3, -3.0 * h1, rtol=1e-13, atol=0)
    torch.testing.assert_close(w3, -3.0 * w1, rtol=1e-13, atol=0)


def test_chunked_with_a_frozen_hidden_state_trains_only_the_head(gen):
    hidden, weight, ids, logprobs, labels = inputs(gen)
    spec = spec_of(ids, logprobs, labels, ce=0.5)
    w = weight.clone().requires_grad_()
    loss, _ = chunked(hidden, w, spec, chunk_size=4)
    (gw,) = torch.autograd.grad(loss, [w])
    torch.testing.assert_close(gw, loss_and_grads(naive, hidden, weight, spec)[2], rtol=1e-11, atol=1e-13)


def test_chunked_under_no_grad_gives_the_loss_and_metrics(gen):
    hidden, weight, ids, logprobs, labels = inputs(gen)
    spec = spec_of(ids, logprobs, labels, temperature=2.0, ce=0.5)
    with torch.no_grad():
        loss, metrics = chunked(hidden.clone().requires_grad_(), weight, spec, chunk_size=3)
    assert not loss.requires_grad and loss.grad_fn is None
    assert loss.item() == pytest.approx(naive(hidden, weight, spec)[0].item(), rel=1e-13)
    assert int(metrics["n_tokens"]) == 6


def test_chunked_in_bfloat16_returns_bfloat16_gradients_close_to_float32(gen):
    hidden, weight, ids, logprobs, labels = inputs(gen, dtype=torch.float32)
    spec = spec_of(ids, logprobs, labels, ce=0.5, dtype=torch.float32)
    loss, h, w, _ = loss_and_grads(chunked, hidden.bfloat16(), weight.bfloat16(), spec, chunk_size=3)
    ref = loss_and_grads(naive, hidden, weight, spec)
    assert loss.dtype == torch.float32 and (h.dtype, w.dtype) == (torch.bfloat16, torch.bfloat16)
    assert loss.item() == pytest.approx(ref[0].item(), rel=2e-2)
    assert float((w.float() - ref[2]).norm() / ref[2].norm()) < 5e-2


def test_an_empty_batch_is_zero_with_zero_gradients(gen):
    hidden, weight, ids, logprobs, labels = inputs(gen)
    spec = spec_of(ids[:0], logprobs[:0], labels[:0])
    for fn in (naive, chunked):
        loss, h, w, metrics = loss_and_grads(fn, hidden[:0], weight, spec)
        assert loss.item() == 0.0 and h.shape == (0, 6)
        assert torch.equal(w, torch.zeros_like(weight)) and int(metrics["n_tokens"]) == 0
