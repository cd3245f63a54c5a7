"""The cross-tokenizer loss: the ordinary sparse KD as its special case, the ULD term by hand and by
gradcheck, the modes, and bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from formats.example import IGNORE_INDEX
from train_student.xtok.align import Alignment, student_targets
from train_student.loss import kd_loss
from train_student.xtok.loss import xtok_loss


def _cached_rows(seed: int, t: int, k: int, v: int, *, pad_every: int = 0):
    """Teacher top-k rows as a cache holds them: distinct ids in rank order, raw logprobs, some -1 padding."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(v, size=k, replace=False) for _ in range(t)]).astype(np.int32)
    logits = rng.normal(0, 2, size=(t, v))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    lps = np.take_along_axis(logp, ids, 1)
    order = np.argsort(-lps, axis=1)
    ids, lps = np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1).astype(np.float32)
    if pad_every:
        ids[::pad_every, -1], lps[::pad_every, -1] = -1, -np.inf
    return ids, lps


@pytest.mark.parametrize("t,d,v,k", [(1, 3, 5, 1), (7, 5, 11, 3), (13, 17, 37, 8), (33, 9, 64, 64)])
@pytest.mark.parametrize(
    "kind,tail",
    [("forward_kl", "renormalize"), ("forward_kl", "bucket"), ("reverse_kl", "bucket"), ("reverse_kl", "renormalize")],
)
@pytest.mark.parametrize("mode", ["exact-map", "hybrid"])
def test_identical_tokenizers_give_kd_loss_exactly(t, d, v, k, kind, tail, mode):
    """Self-alignment (every position its own 1:1 span, the identity vocabulary map) through
    `student_targets` and `xtok_loss` gives `kd_loss`'s loss and gradients, fp64, to 1e-10."""
    ids, lps = _cached_rows(seed=t * 100 + k, t=t, k=k, v=v, pad_every=3)
    labels = torch.from_numpy(np.random.default_rng(t).integers(0, v, t)).long()
    labels[::4] = IGNORE_INDEX  # untrained rows (a packed batch has them)
    trained = (labels != IGNORE_INDEX).numpy()
    alignment = Alignment(
        "x",
        np.zeros(t + 1, np.int32),
        np.arange(1, t + 1, dtype=np.int32),
        np.where(trained, np.arange(t), -1).astype(np.int32),
        trained.copy(),
        np.zeros((0, 2), np.int32),
        np.zeros((0, 2), np.int32),
    )
    targets = student_targets(alignment, ids, lps, np.arange(v, dtype=np.int32), mode)
    assert targets.exact[trained].all()

    gen = torch.Generator().manual_seed(t + d)
    hidden = torch.randn(t, d, dtype=torch.float64, generator=gen)
    weight = torch.randn(v, d, dtype=torch.float64, generator=gen)
    settings = dict(kd_weight=0.7, ce_weight=0.3, temperature=1.5, kind=kind, tail=tail)

    def run(fn, *args, **kw):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = fn(h, w, *args, **settings, **kw)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    ref = run(
        kd_loss,
        torch.from_numpy(np.where(trained[:, None], ids, -1)),
        torch.from_numpy(np.where(trained[:, None], lps, -np.inf)),
        labels,
    )
    got = run(
        xtok_loss,
        torch.from_numpy(targets.topk_ids),
        torch.from_numpy(targets.topk_logprobs),
        labels,
        torch.from_numpy(targets.exact),
        torch.from_numpy(targets.aligned),
        mode=mode,
    )
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


def test_uld_term_by_hand():
    """One ULD row, V = 3, K = 2, tau = 1: |p_(1) - q_(1)| + |p_(2) - q_(2)|, no CE."""
    hidden = torch.tensor([[1.0]], dtype=torch.float64)
    weight = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)  # logits 0, 1, 2
    q = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0).sort(descending=True).values
    p = torch.tensor([0.6, 0.3], dtype=torch.float64)  # raw top-2, tail 0.1
    lps = torch.log(p)[None]
    for tail, p_hat in (("renormalize", p / p.sum()), ("bucket", p)):
        loss, m = xtok_loss(
            hidden,
            weight,
            torch.tensor([[-1, -1]]),
            lps,
            torch.tensor([2]),
            torch.tensor([False]),
            torch.tensor([True]),
            mode="uld",
            tail=tail,
        )
        expected = (p_hat - q[:2]).abs().sum()
        assert abs(float(loss) - float(expected)) < 1e-12, tail
        assert int(m["n_uld"]) == 1 and int(m["n_exact"]) == 0


def test_uld_gradcheck():
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(9, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    _, lps = _cached_rows(seed=3, t=4, k=4, v=9)
    aligned = torch.tensor([True, True, False, True])

    def f(h, w):
        return xtok_loss(
            h,
            w,
            torch.full((4, 4), -1),
            torch.from_numpy(lps).double(),
            torch.tensor([1, 2, 3, 4]),
            torch.zeros(4, dtype=torch.bool),
            aligned,
            mode="uld",
            temperature=2.0,
            ce_weight=0.5,
            chunk_size=3,
        )[0]

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_modes_pick_their_rows():
    """hybrid = exact-map's loss + the ULD rows' term; uld ignores `exact`; exact-map skips ULD."""
    t, d, v, k = 6, 4, 10, 3
    ids, lps = _cached_rows(seed=1, t=t, k=k, v=v)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(t, d, dtype=torch.float64, generator=gen)
    weight = torch.randn(v, d, dtype=torch.float64, generator=gen)
    labels = torch.arange(t)
    exact = torch.tensor([True, True, False, False, True, False])
    aligned = torch.tensor([True, True, True, False, True, True])
    args = (hidden, weight, torch.from_numpy(ids).long(), torch.from_numpy(lps).double(), labels, exact, aligned)
    hybrid, mh = xtok_loss(*args, mode="hybrid", ce_weight=1.0)
    exact_only, me = xtok_loss(*args, mode="exact-map", ce_weight=1.0)
    uld, mu = xtok_loss(*args, mode="uld", ce_weight=1.0)
    assert (int(mh["n_exact"]), int(mh["n_uld"])) == (3, 2)
    assert (int(me["n_exact"]), int(me["n_uld"])) == (3, 0)
    assert (int(mu["n_exact"]), int(mu["n_uld"])) == (0, 5)
    assert abs(float(hybrid) - float(exact_only) - 2 * float(mh["uld"]) / t) < 1e-12
    assert float(mh["aligned_fraction"]) == pytest.approx(5 / 6)


def test_unmapped_entries_go_to_the_tail():
    """An exact row whose second entry has no student twin: its mass is tail (bucket), the same as
    kd_loss with that entry absent."""
    hidden = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    lps = torch.log(torch.tensor([[0.5, 0.3, 0.1]], dtype=torch.float64))
    got, _ = xtok_loss(
        hidden,
        weight,
        torch.tensor([[2, -1, 0]]),
        lps,
        torch.tensor([2]),
        torch.tensor([True]),
        torch.tensor([True]),
        tail="bucket",
    )
    ref, _ = kd_loss(hidden, weight, torch.tensor([[2, 0]]), lps[:, [0, 2]], torch.tensor([2]), tail="bucket")
    assert abs(float(got) - float(ref)) < 1e-12


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(mode="gold"), "mode must be one of"),
        (dict(uld_weight=-1.0), "uld_weight"),
        (dict(exact=torch.zeros(3, dtype=torch.int64)), "exact must be a bool tensor"),
        (dict(aligned=torch.zeros(2, dtype=torch.bool)), "aligned must be a bool tensor"),
    ],
)
def test_bad_arguments_are_named(change, match):
    args = dict(
        hidden=torch.zeros(3, 2),
        lm_head_weight=torch.zeros(4, 2),
        topk_ids=torch.zeros(3, 2, dtype=torch.long),
        topk_logprobs=torch.full((3, 2), math.log(0.5)),
        labels=torch.zeros(3, dtype=torch.long),
        exact=torch.zeros(3, dtype=torch.bool),
        aligned=torch.zeros(3, dtype=torch.bool),
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        xtok_loss(**args)
