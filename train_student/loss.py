"""The student's training loss: sparse top-k knowledge distillation through the LM head.

One public entry, `kd_loss(..., impl=...)`, that validates its inputs and dispatches to

- "naive":   materialized [T, V] logits + autograd (reference; O(T*V) memory),
- "chunked": pure PyTorch over token chunks (O(chunk_size*V) memory; the CPU default),
- "fused":   the Triton kernel in `kernels/sparse_kl_triton.py` (never forms [T, V]; CUDA, or the
             Triton CPU interpreter when TRITON_INTERPRET=1). Triton is imported only here, lazily.

Equations: docs/KD_MATH.md.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from train_student import loss_torch
from train_student.loss_options import IMPLS, KINDS, TAILS, TARGETS, LossSpec
from train_student.loss_torch import sampled_log_weights

__all__ = ["kd_loss", "sampled_log_weights", "student_loss"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def head_inputs(hidden: Tensor, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The LM head's inputs for a loss computed in `dtype` (autocast's dtype, or the model's): the hidden
    states in `dtype`; a float32 head beside half-precision hidden states stays float32 (kd_loss's mixed
    precision: no cast of the [V, D] weight and of its gradient per micro-batch), any other head in `dtype`."""
    hidden = hidden.to(dtype)
    if not (weight.dtype == torch.float32 and dtype in _HALF_DTYPES):
        weight = weight.to(dtype)
    return hidden, weight


def student_loss(
    spec: LossSpec, hidden: Tensor, lm_head_weight: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, labels: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss a `LossSpec` describes: `kd_loss` for a student with the teacher's tokenizer, `xtok_loss`
    (train_student/xtok/loss.py) in the spec's mode for one with another tokenizer. Arguments as kd_loss's."""
    if spec.cross_tokenizer == "off":
        return kd_loss(hidden, lm_head_weight, topk_ids, topk_logprobs, labels, **spec.kd_kwargs())
    from train_student.xtok.loss import xtok_loss

    return xtok_loss(
        hidden,
        lm_head_weight.to(hidden.dtype),  # a float32 head beside half-precision hidden states: cast here
        topk_ids,
        topk_logprobs,
        labels,
        mode=spec.cross_tokenizer,
        uld_weight=spec.uld_weight,
        **spec.kd_kwargs(),
    )


def kd_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    labels: Tensor,
    *,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    tail: str = "renormalize",
    impl: str = "chunked",
    chunk_size: int = 1024,
    targets: str = "topk",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sparse KD (+ optional hard-label CE) of a student LM head against cached teacher top-k.

    total = ce_weight * CE(labels) + kd_weight * tau^2 * KD(teacher || student), averaged over
    the trained positions (labels != -100). A batch with no trained position gives 0 (with a
    grad_fn and zero gradients), never NaN.

    Args:
        hidden: [T, D] float16/bfloat16/float32/float64, the student's final hidden states.
        lm_head_weight: [V, D] on `hidden`'s device, in its dtype or, for a bfloat16/float16 `hidden`,
            float32 (mixed precision: the head's matmuls run in `hidden`'s dtype; impl="chunked" takes the
            half-precision copy once and returns the weight's gradient in float32 with no round trip
            through half precision; the other impls cast the weight first, as autograd would).
        topk_ids: [T, K] integer teacher ids in rank order; -1 pads positions where the cache
            holds fewer than K entries (mass-adaptive caches).
        topk_logprobs: [T, K] float, the teacher's raw log-probabilities at temperature 1; -inf
            for padding.
        labels: [T] int64 next-token ids, -100 where the position is not trained.
        kd_weight, ce_weight: weights of the two terms (finite, >= 0).
        temperature: tau > 0. The student logits are W h / tau; the teacher is p_k^(1/tau)
            renormalized; the KD term is scaled by tau^2. CE is always at temperature 1.
        kind: "forward_kl" (KL(teacher || student)) or "reverse_kl" (KL(student || teacher)).
        tail: "renormalize" (the teacher renormalized over its ids; for reverse KL the student
            too, see `loss_torch.position_terms`) or "bucket" (the teacher's missing mass P is one
            extra bucket matched against the student's mass R outside the teacher's ids).
        impl: "naive", "chunked" or "fused" (see the module docstring).
        chunk_size: tokens per chunk for impl="chunked".
        targets: "topk" (the above) or "sampled": `topk_ids` are sampled teacher ids and `topk_logprobs`
            their log importance weights from `sampled_log_weights` (already at `temperature`: they
            are used as they are, neither tempered nor renormalized). Forward KL only, tail
            "renormalize" (the weights need no tail). The gradient is then the estimator's (unbiased
            with estimator="unbiased"); the `kd` metric is sum_j w_j (log w_j - log q_j), whose value is
            not an estimate of the KL (docs/KD_MATH.md, "Sampled targets").

    Returns:
        loss: [] in the accumulation dtype (fp32, fp64 for fp64 inputs).
        metrics: detached 0-dim tensors kd, ce, top1_agreement, student_topk_mass,
            teacher_tail_mass, n_tokens, n_top1_agree, n_scored (see `loss_torch.summarize`).

    Raises:
        ValueError: bad shapes, dtypes, devices or settings.
        RuntimeError: impl="fused" without CUDA (and without TRITON_INTERPRET=1).

    Ids are not range-checked (that would need a host sync): they must lie in [-1, V), labels in
    [0, V) or be -100.
    """
    _validate(
        hidden,
        lm_head_weight,
        topk_ids,
        topk_logprobs,
        labels,
        kd_weight,
        ce_weight,
        temperature,
        kind,
        tail,
        impl,
        chunk_size,
    )
    _validate_targets(targets, kind, tail)
    if impl == "fused":
        _check_fused_device(hidden)

    spec = loss_torch.build_spec(
        topk_ids,
        topk_logprobs,
        labels,
        kind=kind,
        tail=tail,
        temperature=temperature,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        dtype=loss_torch.accumulation_dtype(hidden.dtype),
        targets=targets,
    )
    if impl == "chunked":
        return loss_torch.chunked(hidden, lm_head_weight, spec, chunk_size=chunk_size)
    lm_head_weight = lm_head_weight.to(hidden.dtype)  # mixed precision elsewhere: autograd carries the cast
    if impl == "naive":
        return loss_torch.naive(hidden, lm_head_weight, spec)

    from train_student.kernels import sparse_kl_triton  # lazy: triton only for this path

    metrics: dict[str, Tensor] = {}
    loss = sparse_kl_triton.fused_linear_sparse_loss(
        hidden,
        lm_head_weight,
        spec.sparse_ids,
        loss_torch.make_terms_fn(spec, metrics),
        temperature=spec.temperature,
        need_lse1=spec.need_lse1,
        need_coef_1=spec.ce_weight != 0.0,
    )
    return loss, metrics


def _validate_targets(targets: str, kind: str, tail: str) -> None:
    if targets not in TARGETS:
        raise ValueError(f"kd_loss: targets must be one of {TARGETS}, got {targets!r}")
    if targets == "sampled" and (kind != "forward_kl" or tail != "renormalize"):
        raise ValueError(
            f"kd_loss: sampled targets estimate forward KL with importance weights that need no tail; got "
            f"kind={kind!r}, tail={tail!r} (use kind='forward_kl', tail='renormalize'; reverse KL would need "
            "samples from the student)"
        )


def _validate(
    hidden, weight, topk_ids, topk_logprobs, labels, kd_weight, ce_weight, temperature, kind, tail, impl, chunk_size
) -> None:
    """Raise ValueError naming the argument, what was expected and what came."""
    if kind not in KINDS:
        raise ValueError(f"kd_loss: kind must be one of {KINDS}, got {kind!r}")
    if tail not in TAILS:
        raise ValueError(f"kd_loss: tail must be one of {TAILS}, got {tail!r}")
    if impl not in IMPLS:
        raise ValueError(f"kd_loss: impl must be one of {IMPLS}, got {impl!r}")
    for name, t in (
        ("hidden", hidden),
        ("lm_head_weight", weight),
        ("topk_ids", topk_ids),
        ("topk_logprobs", topk_logprobs),
        ("labels", labels),
    ):
        if not isinstance(t, Tensor):
            raise ValueError(f"kd_loss: {name} must be a torch.Tensor, got {type(t).__name__}")

    if hidden.dim() != 2:
        raise ValueError(f"kd_loss: hidden must be [T, D], got shape {tuple(hidden.shape)}")
    t, d = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(
            f"kd_loss: lm_head_weight must be [V, D] with D = {d} (hidden's last dim), got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError("kd_loss: lm_head_weight has an empty vocabulary (V = 0)")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_ids.shape[1] < 1:
        raise ValueError(f"kd_loss: topk_ids must be [T, K] with T = {t} and K >= 1, got shape {tuple(topk_ids.shape)}")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(
            f"kd_loss: topk_logprobs must have topk_ids' shape {tuple(topk_ids.shape)}, "
            f"got {tuple(topk_logprobs.shape)}"
        )
    if labels.shape != (t,):
        raise ValueError(f"kd_loss: labels must be [T] with T = {t}, got shape {tuple(labels.shape)}")

    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"kd_loss: hidden must be one of {_FLOAT_DTYPES}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype and not (weight.dtype == torch.float32 and hidden.dtype in _HALF_DTYPES):
        raise ValueError(
            f"kd_loss: lm_head_weight dtype {weight.dtype} differs from hidden's {hidden.dtype} (only a float32 "
            "head beside bfloat16/float16 hidden states is mixed precision); cast one of them"
        )
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise ValueError(f"kd_loss: topk_ids must be an integer tensor (int32/int64), got {topk_ids.dtype}")
    if not topk_logprobs.dtype.is_floating_point:
        raise ValueError(f"kd_loss: topk_logprobs must be a float tensor, got {topk_logprobs.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"kd_loss: labels must be int64 (or int32), got {labels.dtype}")
    if impl == "fused" and hidden.dtype not in _FUSED_DTYPES:
        raise ValueError(
            f"kd_loss: impl='fused' supports {_FUSED_DTYPES}, got {hidden.dtype}; use impl='chunked' for float64"
        )

    devices = {x.device for x in (hidden, weight, topk_ids, topk_logprobs, labels)}
    if len(devices) != 1:
        raise ValueError(f"kd_loss: all tensors must be on one device, got {sorted(map(str, devices))}")

    for name, w in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"kd_loss: {name} must be a finite number >= 0, got {w!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"kd_loss: temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"kd_loss: chunk_size must be a positive int, got {chunk_size!r}")


def _check_fused_device(hidden: Tensor) -> None:
    """impl="fused" runs on CUDA tensors, or anywhere under the Triton interpreter; no fallback."""
    if hidden.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if not torch.cuda.is_available():
        raise RuntimeError(
            "kd_loss: impl='fused' needs a CUDA GPU (it is a Triton GPU kernel) and none is "
            "available here; use impl='chunked' (pure PyTorch, same loss), or set "
            "TRITON_INTERPRET=1 to run the kernel in Triton's slow CPU interpreter (tests only)"
        )
    raise RuntimeError(
        f"kd_loss: impl='fused' needs CUDA tensors, got hidden on {hidden.device}; move the "
        "inputs to the GPU or use impl='chunked'"
    )


# ---- held-out evaluation: one definition for `kdcache train` and train_student.hf ----------------
def eval_sums(metrics: dict[str, Tensor], targets: int | Tensor) -> dict[str, Tensor]:
    """One batch's contribution to the held-out sums (0-dim tensors, no host sync): the means of
    kd_loss's metrics weighted by the batch's trained positions (in float64), top-1 as exact counts."""
    t = torch.as_tensor(targets, device=metrics["kd"].device).double()
    return {
        "kd": metrics["kd"].double() * t,
        "ce": metrics["ce"].double() * t,
        "topk_mass": metrics["student_topk_mass"].double() * t,
        "n_top1_agree": metrics["n_top1_agree"].double(),
        "n_scored": metrics["n_scored"].double(),
        "targets": t,
    }


def eval_row(sums: dict[str, float]) -> dict:
    """The held-out metrics from the sums over every batch and process: KL(teacher || student) (the
    evaluation spec's KD term), CE, perplexity, top-1 agreement, the student's mass on the teacher's ids."""
    tok = max(sums["targets"], 1.0)
    return {
        "kl": sums["kd"] / tok,
        "ce": sums["ce"] / tok,
        "ppl": math.exp(min(sums["ce"] / tok, 50)),
        "top1_agreement": sums["n_top1_agree"] / max(sums["n_scored"], 1.0),
        "student_topk_mass": sums["topk_mass"] / tok,
        "targets": int(sums["targets"]),
    }
