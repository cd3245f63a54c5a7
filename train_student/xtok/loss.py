"""Cross-tokenizer KD loss: the teacher's top-k from a cache made with another tokenizer.

One public function, `xtok_loss`. Its inputs come from `train_student.xtok.align` (which student
position is paired with which teacher row, and whether the pair is a 1:1 span) and
`train_student.xtok.vocab_map` (teacher ids translated to student ids). Per trained student position:

- exact rows (1:1 span, at least one teacher entry with a student twin; modes exact-map, hybrid):
  the mapped entries are sparse targets in the student's vocabulary, exactly today's sparse KD
  (`loss.kd_loss`, same kind / tail / temperature / impl, the fused kernel included); entries
  without a twin are missing, so their mass is the teacher's tail (renormalized away, or the
  tail bucket);
- ULD rows (every other aligned row; modes uld, hybrid): the vocabulary-free distance of the
  Universal Logit Distillation loss (Boizard et al. 2024), sum_k |p_(k) - q_(k)| between the
  teacher's top-k probabilities sorted in decreasing order and the student's k largest
  probabilities (full softmax), k = the cache's K. For sorted vectors this L1 distance is the
  closed form of ULD's Wasserstein-1 distance;
- every trained row: the ordinary CE on the student's own next token (ce_weight).

total = (1/N) sum_trained [ce_weight CE + kd_weight tau^2 KD_exact + uld_weight ULD], N the trained
positions. Math, choices and a worked example: docs/CROSS_TOKENIZER.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from formats.example import IGNORE_INDEX
from train_student import loss_torch
from train_student.loss import kd_loss
from train_student.loss_options import XTOK_MODES

__all__ = ["xtok_loss"]


def xtok_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    labels: Tensor,
    exact: Tensor | None = None,
    aligned: Tensor | None = None,
    *,
    mode: str = "hybrid",
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    uld_weight: float = 1.0,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    tail: str = "renormalize",
    impl: str = "chunked",
    chunk_size: int = 1024,
    targets: str = "topk",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-tokenizer KD (+ CE) of a student LM head against teacher top-k paired by alignment.

    Args:
        hidden, lm_head_weight, labels, kd_weight, ce_weight, temperature, kind, tail, impl,
            chunk_size: as in `loss.kd_loss` (row t of hidden predicts labels[t]).
        topk_ids: [T, K] student ids of the teacher's entries on exact rows (-1: padding or no
            student twin); ignored on other rows (`align.StudentTargets.topk_ids`).
        topk_logprobs: [T, K] the paired teacher row's raw logprobs at temperature 1 (-inf padding;
            all -inf where no teacher row is paired).
        exact: [T] bool, the row is an exact-map target; None: rows with an id >= 0.
        aligned: [T] bool, a teacher row is paired; None: rows with a finite logprob. (The defaults
            read the rows of `align.student_example`'s examples packed by `data.pack_batch`.)
        mode: "exact-map" (exact rows only), "uld" (every aligned row by ULD, exact ignored) or
            "hybrid" (exact rows exact, the other aligned rows ULD).
        uld_weight: weight of the ULD term (finite, >= 0). It is not scaled by tau^2: a distance
            between probability vectors is bounded by 2 at any temperature.

    Returns:
        loss: [] in the accumulation dtype; metrics: `kd_loss`'s (kd and teacher_tail_mass are
        means over all trained positions, 0 on rows without an exact target) plus uld (mean over
        ULD rows), n_exact, n_uld, n_aligned (trained rows of each kind) and aligned_fraction.

    With one tokenizer on both sides every trained row is exact and every id maps to itself, and
    the result is `kd_loss`'s, loss and gradients (tests/train_student/test_loss_xtok.py).
    """
    if targets != "topk":
        raise ValueError(
            f"xtok_loss: cross-tokenizer KD takes top-k targets only, got targets={targets!r}: sampled targets' "
            "importance weights are per teacher token, and ULD's sorted-probability matching and the exact map's "
            "renormalization are not unbiased estimators of them; train a student with the teacher's tokenizer "
            "on sampled targets, or use a top-k cache here"
        )
    if exact is None and isinstance(topk_ids, Tensor):
        exact = (topk_ids >= 0).any(dim=-1)
    if aligned is None and isinstance(topk_logprobs, Tensor):
        aligned = (topk_logprobs > -math.inf).any(dim=-1)
    _validate(hidden, topk_ids, labels, exact, aligned, mode, uld_weight)
    trained = labels != IGNORE_INDEX
    exact_rows = exact & trained if mode != "uld" else torch.zeros_like(exact)
    uld_rows = aligned & trained & ~exact_rows if mode != "exact-map" else torch.zeros_like(aligned)

    missing = torch.full_like(topk_logprobs, -math.inf)
    sparse_ids = torch.where(exact_rows[:, None], topk_ids, torch.full_like(topk_ids, -1))
    sparse_logprobs = torch.where(exact_rows[:, None] & (topk_ids >= 0), topk_logprobs, missing)
    loss, metrics = kd_loss(
        hidden,
        lm_head_weight,
        sparse_ids,
        sparse_logprobs,
        labels,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        temperature=temperature,
        kind=kind,
        tail=tail,
        impl=impl,
        chunk_size=chunk_size,
    )

    n_tokens = trained.sum()
    denom = n_tokens.clamp(min=1).to(loss.dtype)
    uld_sum = torch.zeros((), dtype=loss.dtype, device=loss.device)
    n_uld = uld_rows.sum()
    if uld_weight and bool(n_uld > 0):  # one host sync: skip the full-vocab top-k when no row needs it
        rows = uld_rows.nonzero().squeeze(1)
        uld_sum = _uld_distance(
            hidden[rows],
            lm_head_weight,
            topk_logprobs[rows],
            labels[rows],
            temperature=temperature,
            tail=tail,
            chunk_size=chunk_size,
        ).sum()
        loss = loss + uld_weight * uld_sum / denom
    with torch.no_grad():
        n_aligned = (aligned & trained).sum()
        metrics.update(
            uld=uld_sum.detach() / n_uld.clamp(min=1).to(loss.dtype),
            n_exact=exact_rows.sum(),
            n_uld=n_uld,
            n_aligned=n_aligned,
            aligned_fraction=n_aligned.to(loss.dtype) / denom,
        )
    return loss, metrics


def _uld_distance(
    hidden: Tensor,
    weight: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    tail: str,
    chunk_size: int,
) -> Tensor:
    """[R] sum_k |p_(k) - q_(k)|: the teacher's top-k probabilities at tau (renormalized over its
    entries, or normalized together with its tail bucket, as in `loss_torch.build_spec`) against
    the student's k largest probabilities at tau, both sorted in decreasing order."""
    acc = loss_torch.accumulation_dtype(hidden.dtype)
    ids = torch.where(teacher_logprobs > -math.inf, 0, -1)  # entries exist; the ids do not matter here
    spec = loss_torch.build_spec(
        ids,
        teacher_logprobs,
        labels,
        kind="forward_kl",
        tail=tail,
        temperature=temperature,
        kd_weight=1.0,
        ce_weight=0.0,
        dtype=acc,
    )
    teacher = (spec.teacher_logp.exp() * spec.valid).sort(dim=-1, descending=True).values  # [R, K]
    k = min(teacher.shape[1], weight.shape[0])
    student = torch.cat(
        [
            # Recomputed in the backward: only one [chunk, V] block of logits is alive at a time.
            checkpoint(
                _student_top_probs, hidden[start : start + chunk_size], weight, k, temperature, acc, use_reentrant=False
            )
            for start in range(0, hidden.shape[0], chunk_size)
        ]
    )
    if k < teacher.shape[1]:  # a vocabulary smaller than K: the rest of the student's sorted vector is 0
        student = torch.nn.functional.pad(student, (0, teacher.shape[1] - k))
    return (teacher - student).abs().sum(dim=-1)


def _student_top_probs(hidden: Tensor, weight: Tensor, k: int, temperature: float, acc: torch.dtype) -> Tensor:
    """[C, k] the student's k largest probabilities at temperature tau, decreasing."""
    logits = (hidden @ weight.T).to(acc) / temperature
    return torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1).values.exp()


def _validate(hidden, topk_ids, labels, exact, aligned, mode, uld_weight) -> None:
    """What `kd_loss` does not check itself (it validates the rest)."""
    if mode not in XTOK_MODES:
        raise ValueError(f"xtok_loss: mode must be one of {XTOK_MODES}, got {mode!r}")
    if not isinstance(uld_weight, (int, float)) or not math.isfinite(uld_weight) or uld_weight < 0:
        raise ValueError(f"xtok_loss: uld_weight must be a finite number >= 0, got {uld_weight!r}")
    t = hidden.shape[0] if isinstance(hidden, Tensor) and hidden.dim() == 2 else None
    for name, mask in (("exact", exact), ("aligned", aligned)):
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (t,):
            raise ValueError(
                f"xtok_loss: {name} must be a bool tensor [T] with T = {t}, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}"
            )
