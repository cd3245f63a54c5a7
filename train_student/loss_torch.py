"""Sparse top-k KD losses over a linear LM head in plain PyTorch: the CPU default and the reference.

Two implementations of the same loss (see `train_student.loss.kd_loss` for the public entry and
docs/KD_MATH.md for the equations):

- `naive`: materializes the [T, V] logits and lets autograd do the rest. Simple, O(T*V) memory;
  the reference the other implementations are tested against.
- `chunked`: a `torch.autograd.Function` that walks the tokens in chunks of `chunk_size`, so the
  largest live tensor is [chunk_size, V]. The forward keeps, per position, only the log-sum-exp
  and the logits at the teacher's ids (and the label); the backward recomputes each chunk's
  logits and forms dL/dz = a * q + scatter(c) (docs/KD_MATH.md, "the general shape").

Both share `KDSpec` (the teacher side, prepared once) and `position_terms` (the loss as a
function of the per-position log-sum-exp and the gathered logits), so the chunked path and the
fused Triton kernel differ from `naive` only in how they get those two numbers and how they push
the gradient back through the LM head.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import Tensor

from formats.example import IGNORE_INDEX

# Smallest tail mass taken as real. Student: R = 1 - Q is clamped at it; log R is computed as
# log(-expm1(log Q)), and in fp32 log Q carries an absolute error of ~1e-7 * |lse|, so smaller
# tails are not resolvable; the clamp has zero gradient, so a rounding-level tail cannot produce a
# huge P/R coefficient. Teacher: P = 1 - sum_k exp(l_k) below it is taken as 0, because fp32
# logprobs each carry ~6e-8 relative error and K of them sum to that much noise; P^(1/tau) and
# reverse KL's log P would amplify it (tau = 2 turns a 1e-8 rounding residue into a 1e-4 tail).
# Reverse KL also floors the teacher tail at it (else KL = inf wherever P = 0 < R).
TAIL_EPS = 1e-6

# (loss [], coef_tau [T], coef_1 [T] | None, coef_sparse [T, K+1]) from (lse_tau, lse_1, s_sparse,
# argmax): what a fused/chunked implementation needs to run its backward. See `make_terms_fn`.
TermsFn = Callable[[Tensor, "Tensor | None", Tensor, Tensor], "tuple[Tensor, Tensor, Tensor | None, Tensor]"]


@dataclasses.dataclass(frozen=True)
class KDSpec:
    """The teacher side of the loss and its settings, prepared once per call ([T, K] tensors).

    Attributes:
        kind, tail, temperature, kd_weight, ce_weight: as in `kd_loss`.
        sparse_ids: [T, K+1] int64, the teacher's ids (padding mapped to 0) then the label
            (ignored positions mapped to 0): the logits every implementation gathers.
        valid: [T, K] bool, the cached entries that exist (id >= 0 and logprob > -inf).
        teacher_logp: [T, K] log p_hat_k, the teacher at temperature tau over its ids
            (renormalized, or normalized together with the tail bucket); 0 where not valid.
        teacher_log_tail: [T] log P_hat, the teacher's tail at tau (-inf where P = 0); only for
            tail="bucket", else None.
        trained: [T] bool, labels != IGNORE_INDEX.
        n_tokens: 0-dim int64, trained positions.
        teacher_tail_raw: [T] P = 1 - sum_k exp(l_k) at temperature 1; 0 where below TAIL_EPS.
        teacher_top1: [T] int64, the teacher's first id (a metric).
        has_teacher: [T] bool, at least one valid entry.
    """

    kind: str
    tail: str
    temperature: float
    kd_weight: float
    ce_weight: float
    sparse_ids: Tensor
    valid: Tensor
    teacher_logp: Tensor
    teacher_log_tail: Tensor | None
    trained: Tensor
    n_tokens: Tensor
    teacher_tail_raw: Tensor
    teacher_top1: Tensor
    has_teacher: Tensor

    @property
    def need_lse1(self) -> bool:
        """Whether CE needs its own temperature-1 log-sum-exp (at tau = 1 it equals lse_tau)."""
        return self.temperature != 1.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (tests); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def build_spec(
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    labels: Tensor,
    *,
    kind: str,
    tail: str,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
    dtype: torch.dtype,
    targets: str = "topk",
) -> KDSpec:
    """Prepare the teacher targets at temperature `temperature` (inputs already validated).

    Args:
        topk_ids: [T, K] integer teacher ids, -1 for padding.
        topk_logprobs: [T, K] raw teacher logprobs at temperature 1, -inf for padding.
        labels: [T] integer next-token ids, -100 where the position is not trained.
        dtype: the accumulation dtype (fp32, or fp64 in tests) of the returned float tensors.

    The teacher side is [T, K], so it is computed in float64 whatever `dtype`: an fp32 logsumexp
    near 0 alone has ~6e-8 absolute error, the size of the tails that matter here.
    """
    tau = float(temperature)
    ids = topk_ids.long()
    logp = topk_logprobs.to(torch.float64)
    valid = (ids >= 0) & (logp > -math.inf)
    has_teacher = valid.any(dim=-1)
    logp_valid = logp.masked_fill(~valid, -math.inf)

    # P = 1 - S without cancellation (S = exp(logsumexp l)); rounding-level tails are 0 (TAIL_EPS).
    teacher_tail_raw = -torch.expm1(torch.logsumexp(logp_valid, dim=-1))
    teacher_tail_raw = torch.where(teacher_tail_raw < TAIL_EPS, 0.0, teacher_tail_raw)
    scaled = logp_valid / tau  # log p_k^(1/tau), unnormalized
    if targets == "sampled":  # log importance weights, already at tau: used as they are (docs/KD_MATH.md)
        teacher_tail_raw = torch.zeros_like(teacher_tail_raw)
        scaled = logp_valid
        log_den = torch.zeros_like(teacher_tail_raw)
        teacher_log_tail = None
    elif tail == "renormalize":
        log_den = torch.logsumexp(scaled, dim=-1)
        teacher_log_tail = None
    else:
        # The tail's shape is unknown, so P^(1/tau) is the tail bucket's weight (docs/KD_MATH.md).
        log_tail_scaled = torch.log(teacher_tail_raw) / tau  # -inf where P = 0
        log_den = torch.logaddexp(torch.logsumexp(scaled, dim=-1), log_tail_scaled)
        teacher_log_tail = log_tail_scaled - log_den
    # Rows without any teacher entry have log_den = -inf (renormalize); they contribute nothing.
    log_den = torch.where(has_teacher, log_den, torch.zeros_like(log_den))
    teacher_logp = torch.where(valid, scaled - log_den[:, None], torch.zeros_like(scaled))

    labels = labels.long()
    trained = labels != IGNORE_INDEX
    sparse_ids = torch.cat([ids.clamp(min=0), labels.clamp(min=0)[:, None]], dim=1)
    return KDSpec(
        kind=kind,
        tail=tail,
        temperature=tau,
        kd_weight=float(kd_weight),
        ce_weight=float(ce_weight),
        sparse_ids=sparse_ids,
        valid=valid,
        teacher_logp=teacher_logp.to(dtype),
        teacher_log_tail=teacher_log_tail.to(dtype) if teacher_log_tail is not None else None,
        trained=trained,
        n_tokens=trained.sum(),
        teacher_tail_raw=teacher_tail_raw.to(dtype),
        teacher_top1=ids[:, 0],
        has_teacher=has_teacher,
    )


def sampled_log_weights(
    counts: Tensor,
    teacher_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    proposal_temperature: float = 1.0,
    proposal_log_z: Tensor | None = None,
    estimator: str = "unbiased",
) -> Tensor:
    """The log importance weights of sampled teacher targets, for `kd_loss(..., targets="sampled")`.

    Per position the teacher's full distribution p was sampled N times from the proposal
    r = p^(1/proposal_temperature) / Z_r; the distinct ids are kept with their draw counts c_j and
    their teacher logprobs l_j = log p_j (temperature 1). The KD target is p_tau = p^(1/tau) / Z_tau.

    - "unbiased" (temperature 1 only): w_j = (c_j / N) p_j / r_j. E[w_j] = p_j for every id, so the
      gradient sum_j w_j grad(-log q_j) is an unbiased estimate of the full KL's. Needs log Z_r
      (`proposal_log_z`, [T]) unless proposal_temperature is 1 (then w_j = c_j / N).
    - "self_normalized": w_j proportional to c_j p_j^(1/tau) / r_j, scaled to sum to 1: any tau, no
      normalizer needed; biased by O(1/N), with a lower variance (docs/KD_MATH.md).

    Args:
        counts: [T, K] integer draws per stored id (0 pads; a row of zeros: no teacher entry).
        teacher_logprobs: [T, K] float l_j at the stored ids (anything where the count is 0).
    Returns:
        [T, K] float64 log weights, -inf where the count is 0.
    """
    from train_student.loss_options import ESTIMATORS

    if estimator not in ESTIMATORS:
        raise ValueError(f"sampled_log_weights: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    for name, value in (("temperature", temperature), ("proposal_temperature", proposal_temperature)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"sampled_log_weights: {name} must be a finite number > 0, got {value!r}")
    if counts.shape != teacher_logprobs.shape or counts.dim() != 2:
        raise ValueError(
            f"sampled_log_weights: counts {tuple(counts.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must be one [T, K] shape"
        )
    if counts.dtype.is_floating_point or bool((counts < 0).any()):
        raise ValueError("sampled_log_weights: counts must be integers >= 0")
    drawn = counts > 0
    log_c = torch.log(counts.to(torch.float64)).masked_fill(~drawn, -math.inf)
    logp = teacher_logprobs.to(torch.float64).masked_fill(~drawn, 0.0)
    if estimator == "unbiased":
        if temperature != 1.0:
            raise ValueError(
                f"sampled_log_weights: the unbiased estimator targets the teacher at temperature 1 (the "
                f"tempered teacher's normalizer is not known from samples); got temperature={temperature}: "
                "use estimator='self_normalized'"
            )
        log_n = torch.log(counts.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float64))
        log_w = log_c - log_n
        if proposal_temperature != 1.0:
            if proposal_log_z is None:
                raise ValueError(
                    "sampled_log_weights: the unbiased estimator with proposal_temperature != 1 needs "
                    "proposal_log_z (log sum_v p_v^(1/proposal_temperature) per position)"
                )
            log_w = log_w + logp * (1.0 - 1.0 / proposal_temperature) + proposal_log_z.to(torch.float64)[:, None]
        return log_w.masked_fill(~drawn, -math.inf)
    u = log_c + logp * (1.0 / temperature - 1.0 / proposal_temperature)
    log_w = u - torch.logsumexp(u, dim=-1, keepdim=True)
    return log_w.masked_fill(~drawn, -math.inf)


def position_terms(
    spec: KDSpec, lse_tau: Tensor, lse_1: Tensor | None, s_sparse: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss as a function of the log-sum-exp and the gathered logits (differentiable).

    Args:
        lse_tau: [T] log-sum-exp of the student logits z = s / tau over the full vocabulary.
        lse_1: [T] log-sum-exp of s (temperature 1), or None when tau = 1.
        s_sparse: [T, K+1] the student's raw logits s = W h at `spec.sparse_ids`.

    Returns:
        loss: [] the total, ce_weight * CE + kd_weight * tau^2 * KD averaged over trained positions.
        kd: [T] per-position KD (no weights, no tau^2).
        ce: [T] per-position CE at temperature 1.
        log_q_mass: [T] log Q, the student's log-mass (at tau) on the teacher's ids.
    """
    tau = spec.temperature
    valid = spec.valid
    k = valid.shape[1]
    s_k, s_y = s_sparse[:, :k], s_sparse[:, k]
    zero = torch.zeros((), dtype=s_sparse.dtype, device=s_sparse.device)

    logq = s_k / tau - lse_tau[:, None]  # log q_{i_k}
    # masked_fill's backward zeroes the masked entries, which also clears the NaN that
    # logsumexp's backward yields on rows with no valid entry at all.
    log_q_mass = torch.logsumexp(logq.masked_fill(~valid, -math.inf), dim=-1)
    log_r = torch.log((-torch.expm1(log_q_mass)).clamp(min=TAIL_EPS))  # log R, stable
    logq = torch.where(valid, logq, zero)
    log_p = spec.teacher_logp  # 0 where not valid

    if spec.kind == "forward_kl":
        p = log_p.exp() * valid
        kd = (p * (log_p - logq)).sum(dim=-1)
        if spec.tail == "bucket":
            p_tail = spec.teacher_log_tail.exp()
            # P log P -> 0 as P -> 0 (xlogy), so a zero teacher tail contributes exactly 0.
            kd = kd + torch.xlogy(p_tail, p_tail) - p_tail * log_r
    elif spec.tail == "bucket":  # reverse KL with the tail bucket (docs/KD_MATH.md)
        q = logq.exp() * valid
        kd = (q * (logq - log_p)).sum(dim=-1)
        # Reverse KL is infinite where the teacher tail is 0 and the student's is not; flooring the
        # teacher tail at TAIL_EPS keeps it finite and still pushes R down to the floor.
        log_p_tail = spec.teacher_log_tail.clamp(min=math.log(TAIL_EPS))
        kd = kd + log_r.exp() * (log_r - log_p_tail)
    else:
        # Reverse KL, renormalized: KL(q~ || p_hat) with the student renormalized over the teacher's
        # ids too. Reverse KL against a teacher with no tail mass is infinite unless the student has
        # none either, and the truncated sum over the ids alone is minimized by moving mass off them;
        # the renormalized form is a proper divergence (>= 0), but it does not ask the student to
        # put mass on the teacher's ids: use tail="bucket" for that.
        z_masked = (s_k / tau).masked_fill(~valid, -math.inf)
        log_qt = z_masked - torch.logsumexp(z_masked, dim=-1, keepdim=True)
        log_qt = torch.where(valid, log_qt, zero)
        qt = log_qt.exp() * valid
        kd = (qt * (log_qt - log_p)).sum(dim=-1)

    ce = (lse_1 if lse_1 is not None else lse_tau) - s_y
    per_position = spec.kd_weight * tau * tau * kd + spec.ce_weight * ce
    trained = spec.trained
    denom = spec.n_tokens.clamp(min=1).to(per_position.dtype)
    loss = torch.where(trained, per_position, zero).sum() / denom
    return loss, kd, ce, log_q_mass


def summarize(spec: KDSpec, kd: Tensor, ce: Tensor, log_q_mass: Tensor, argmax: Tensor) -> dict[str, Tensor]:
    """Per-batch metrics as detached 0-dim tensors (no host sync; call float() to log them).

    kd and ce are means over trained positions (kd without kd_weight and tau^2); top1_agreement is
    over trained positions that have a teacher entry (n_top1_agree of n_scored, exact counts beside
    the ratio); student_topk_mass is at the KD temperature.
    """
    with torch.no_grad():
        trained = spec.trained
        denom = spec.n_tokens.clamp(min=1).to(kd.dtype)

        def mean(x: Tensor) -> Tensor:
            return torch.where(trained, x.to(kd.dtype), torch.zeros_like(kd)).sum() / denom

        scored = trained & spec.has_teacher
        agree = (argmax.long() == spec.teacher_top1) & scored
        return {
            "kd": mean(kd.detach()),
            "ce": mean(ce.detach()),
            "top1_agreement": agree.sum().to(kd.dtype) / scored.sum().clamp(min=1).to(kd.dtype),
            "n_top1_agree": agree.sum(),
            "n_scored": scored.sum(),
            "student_topk_mass": mean(log_q_mass.detach().exp()),
            "teacher_tail_mass": mean(spec.teacher_tail_raw),
            "n_tokens": spec.n_tokens.detach(),
        }


def make_terms_fn(spec: KDSpec, metrics: dict, keep_terms: bool = False) -> TermsFn:
    """The per-position coefficients a, c of the general form in docs/KD_MATH.md, for chunked and fused.

    The returned function takes (lse_tau [T], lse_1 [T] | None, s_sparse [T, K+1], argmax [T]),
    differentiates `position_terms` w.r.t. its three inputs on these small tensors, fills
    `metrics`, and returns (loss, coef_tau, coef_1, coef_sparse) such that the gradient w.r.t. the
    raw logits s = W h of one position is

        dL/ds_v = coef_tau * softmax(s / tau)_v + coef_1 * softmax(s)_v + sum_j coef_sparse_j [v = id_j]

    (coef_tau already includes the 1/tau of z = s / tau; coef_1 is None when tau = 1).
    """

    def terms(lse_tau: Tensor, lse_1: Tensor | None, s_sparse: Tensor, argmax: Tensor):
        with torch.enable_grad():
            leaves = [lse_tau.detach().requires_grad_(), s_sparse.detach().requires_grad_()]
            if lse_1 is not None:
                leaves.append(lse_1.detach().requires_grad_())
            loss, kd, ce, log_q_mass = position_terms(
                spec, leaves[0], leaves[2] if lse_1 is not None else None, leaves[1]
            )
            grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        if keep_terms:  # the per-position terms (a chunk of a call: summarized once for the whole call)
            metrics["terms"] = (kd.detach(), ce.detach(), log_q_mass.detach())
        else:
            metrics.update(summarize(spec, kd, ce, log_q_mass, argmax))
        coef_tau = grads[0] / spec.temperature
        coef_1 = grads[2] if lse_1 is not None else None
        return loss.detach(), coef_tau, coef_1, grads[1]

    return terms


def naive(hidden: Tensor, weight: Tensor, spec: KDSpec) -> tuple[Tensor, dict[str, Tensor]]:
    """Materialize the [T, V] logits and differentiate with plain autograd (the reference).

    Args:
        hidden: [T, D] float; weight: [V, D] float, same dtype, or float32 beside half-precision hidden.
    Returns:
        (loss [], metrics).
    """
    acc = accumulation_dtype(hidden.dtype)
    s = (hidden @ weight.T).to(acc)  # [T, V]; bf16 logits are upcast, as a model would
    lse_tau = torch.logsumexp(s / spec.temperature, dim=-1)
    lse_1 = torch.logsumexp(s, dim=-1) if spec.need_lse1 else None
    s_sparse = s.gather(1, spec.sparse_ids)
    loss, kd, ce, log_q_mass = position_terms(spec, lse_tau, lse_1, s_sparse)
    return loss, summarize(spec, kd, ce, log_q_mass, s.detach().argmax(dim=-1))


def _chunk_logits(h: Tensor, weight: Tensor, acc: torch.dtype) -> Tensor:
    """[C, V] logits of one chunk in the accumulation dtype (the matmul itself in the input dtype)."""
    return (h @ weight.T).to(acc)


def _spec_rows(spec: KDSpec, rows: slice) -> KDSpec:
    """The spec of a chunk of positions; n_tokens stays the whole call's, so the chunk's loss is its share
    of the mean and its gradient coefficients are the whole call's."""
    sliced = {
        f.name: getattr(spec, f.name)[rows]
        for f in dataclasses.fields(spec)
        if f.name not in ("n_tokens",) and isinstance(getattr(spec, f.name), Tensor)
    }
    return dataclasses.replace(spec, **sliced)


class _ChunkedLinearKD(torch.autograd.Function):
    """LM head + sparse KD over token chunks, gradients computed in the forward pass.

    Each chunk's [C, V] logits are formed once: its log-sum-exps and gathered logits give the loss and,
    through `make_terms_fn` on that chunk's positions, the per-position coefficients of dL/ds
    (docs/KD_MATH.md), so the same [C, V] buffer becomes the chunk's gradient in place and dh, dW are
    taken right there (3 matmuls a chunk, no recompute). Backward only scales the stored dh, dW by the
    incoming gradient. Under torch.no_grad (evaluation) no gradient is computed at all."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, spec: KDSpec, chunk_size: int, metrics: dict, grads: tuple):
        need_dh, need_dw = grads
        acc = accumulation_dtype(hidden.dtype)
        n, tau = hidden.shape[0], spec.temperature
        kd = torch.empty(n, dtype=acc, device=hidden.device)
        ce, log_q_mass = torch.empty_like(kd), torch.empty_like(kd)
        argmax = torch.empty(n, dtype=torch.long, device=hidden.device)
        # kept in the accumulation dtype until backward scales them (then cast, as autograd expects)
        dh = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        # a float32 head beside half-precision hidden states (mixed precision): its half copy is taken once
        # here, outside autograd, and dW accumulates in float32 and is returned so (no half round trip)
        w = weight if weight.dtype == hidden.dtype else weight.detach().to(hidden.dtype)
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            part = _spec_rows(spec, rows)
            s = _chunk_logits(hidden[rows], w, acc)
            s_sparse = s.gather(1, part.sparse_ids)
            # one pass gives the top-1 metric and the log-sum-exps' shift (max z = max s / tau, tau > 0)
            m, argmax[rows] = s.max(dim=-1)
            e1 = torch.exp(s - m[:, None]) if spec.need_lse1 else None  # softmax(s) unnormalized
            ez = s.sub_(m[:, None]).div_(tau).exp_() if tau != 1.0 else s.sub_(m[:, None]).exp_()  # in place
            del s
            sum_z = ez.sum(dim=-1)
            lse_tau = m / tau + sum_z.log()
            sum_1 = e1.sum(dim=-1) if e1 is not None else None
            lse_1 = m + sum_1.log() if e1 is not None else None
            chunk_metrics: dict = {}
            terms = make_terms_fn(part, chunk_metrics, keep_terms=True)
            chunk_loss, coef_tau, coef_1, coef_sparse = terms(lse_tau, lse_1, s_sparse, argmax[rows])
            loss += chunk_loss
            kd[rows], ce[rows], log_q_mass[rows] = chunk_metrics["terms"]
            if dh is None and dw is None:
                continue
            # g = a * softmax(z) + b * softmax(s) + scatter(c), built in the exp buffer (docs/KD_MATH.md)
            g = ez.mul_((coef_tau / sum_z)[:, None])
            if e1 is not None:
                g += e1.mul_((coef_1 / sum_1)[:, None])
            del ez, e1
            g.scatter_add_(1, part.sparse_ids, coef_sparse)
            g = g.to(hidden.dtype)
            if dh is not None:
                dh[rows] = g @ w
            if dw is not None:
                dw += (g.T @ hidden[rows]).to(acc)
            del g
        metrics.update(summarize(spec, kd, ce, log_q_mass, argmax))
        ctx.grads, ctx.dtypes = (dh, dw), (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (dh, dw), (h_dtype, w_dtype) = ctx.grads, ctx.dtypes
        if dh is not None:
            dh = (dh * grad_loss.to(dh.dtype)).to(h_dtype)
        if dw is not None:
            dw = (dw * grad_loss.to(dw.dtype)).to(w_dtype)
        return dh, dw, None, None, None, None


def chunked(hidden: Tensor, weight: Tensor, spec: KDSpec, chunk_size: int = 1024) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss with O(chunk_size * V) extra memory: token chunks, gradients taken in the forward pass.

    Args:
        hidden: [T, D] float; weight: [V, D] float, same dtype, or float32 beside half-precision hidden.
        chunk_size: tokens per chunk; the largest live tensor is [chunk_size, V] fp32.
    Returns:
        (loss [], metrics).
    """
    metrics: dict[str, Tensor] = {}
    grads = torch.is_grad_enabled()
    needs = (grads and hidden.requires_grad, grads and weight.requires_grad)
    loss = _ChunkedLinearKD.apply(hidden, weight, spec, int(chunk_size), metrics, needs)
    return loss, metrics
