"""kd_loss with sampled teacher targets (issue 26 item 3): importance-weighted forward KL.

The statistical tests draw, for many sampling seeds, N ids per position from a fixed teacher distribution
(or a tempered proposal), turn them into `sampled_log_weights`, and average the gradient of kd_loss over the
seeds: the unbiased estimator's mean converges to the full-distribution KL gradient within a few standard
errors of the mean, where top-k with renormalization (a biased estimator) stays far off. Seeds are fixed
(own generators), so the tests are deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from train_student.loss import kd_loss, sampled_log_weights
from train_student.xtok.loss import xtok_loss

T, D, V = 3, 6, 40
SEEDS = 400
Z_BOUND = 5.0  # |mean - full| / standard error, over every gradient component


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    teacher = torch.log_softmax(2.0 * torch.randn(T, V, generator=g, dtype=torch.float64), -1)
    labels = torch.randint(0, V, (T,), generator=g)
    return hidden, weight, teacher, labels


def grads(hidden, weight, ids, logprobs, labels, **kw):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, _ = kd_loss(h, w, ids, logprobs, labels, **kw)
    loss.backward()
    return torch.cat([h.grad.reshape(-1), w.grad.reshape(-1)])


def full_gradient(hidden, weight, teacher, labels, temperature=1.0):
    """The exact KL gradient: every vocabulary id as a 'top-k' entry (nothing renormalized away)."""
    ids = torch.arange(V).expand(T, V)
    return grads(hidden, weight, ids, teacher, labels, temperature=temperature)


def draw(teacher, n, gen, proposal_temperature=1.0):
    """N draws per position from p^(1/proposal_temperature), kept as distinct ids with counts (padded)."""
    proposal = torch.softmax(teacher / proposal_temperature, -1)
    draws = torch.multinomial(proposal, n, replacement=True, generator=gen)
    counts = torch.zeros(T, V, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
    k = int((counts > 0).sum(1).max())
    order = torch.argsort(counts, dim=1, descending=True, stable=True)[:, :k]
    c = torch.gather(counts, 1, order)
    ids = torch.where(c > 0, order, -1)
    return ids, c, torch.gather(teacher, 1, order)


def sampled_mean(hidden, weight, teacher, labels, n, *, estimator, temperature=1.0, proposal_temperature=1.0):
    gen = torch.Generator().manual_seed(1234)
    log_z = torch.logsumexp(teacher / proposal_temperature, -1)
    out = []
    for _ in range(SEEDS):
        ids, counts, lps = draw(teacher, n, gen, proposal_temperature)
        log_w = sampled_log_weights(
            counts,
            lps,
            temperature=temperature,
            proposal_temperature=proposal_temperature,
            proposal_log_z=log_z,
            estimator=estimator,
        )
        out.append(grads(hidden, weight, ids, log_w, labels, targets="sampled", temperature=temperature))
    g = torch.stack(out)
    return g.mean(0), g.std(0) / math.sqrt(SEEDS)


def z_scores(mean, se, full):
    return ((mean - full).abs() / (se + 1e-9 * full.abs().max())).max().item()


@pytest.mark.parametrize("proposal_temperature", [1.0, 2.0])
def test_the_unbiased_estimators_mean_gradient_converges_to_the_full_kl_gradient(proposal_temperature):
    hidden, weight, teacher, labels = setup()
    full = full_gradient(hidden, weight, teacher, labels)
    mean, se = sampled_mean(
        hidden, weight, teacher, labels, 12, estimator="unbiased", proposal_temperature=proposal_temperature
    )
    assert z_scores(mean, se, full) < Z_BOUND
    # the tolerance is tight enough to matter: the mean is within a few % of the full gradient's size
    assert (mean - full).norm() / full.norm() < 0.05


def test_top_k_with_renormalization_fails_the_same_test():
    """The control: a biased estimator (the top 5 ids, renormalized) is many standard errors off."""
    hidden, weight, teacher, labels = setup()
    full = full_gradient(hidden, weight, teacher, labels)
    _, se = sampled_mean(hidden, weight, teacher, labels, 12, estimator="unbiased")
    lps, ids = teacher.topk(5, dim=-1)
    biased = grads(hidden, weight, ids, lps, labels)  # deterministic: its mean is itself
    assert z_scores(biased, se, full) > 4 * Z_BOUND  # 36 standard errors at this seed
    assert (biased - full).norm() / full.norm() > 0.1  # and the relative bound above fails too


def test_self_normalized_weights_target_the_tempered_teacher():
    """tau = 2: no unbiased estimator (Z_tau unknown); the self-normalized one is consistent (O(1/N) bias)."""
    hidden, weight, teacher, labels = setup(1)
    full = full_gradient(hidden, weight, teacher, labels, temperature=2.0)
    mean, _ = sampled_mean(hidden, weight, teacher, labels, 400, estimator="self_normalized", temperature=2.0)
    assert (mean - full).norm() / full.norm() < 0.03
    with pytest.raises(ValueError, match="unbiased estimator targets the teacher at temperature 1"):
        sampled_log_weights(torch.ones(T, 2, dtype=torch.int64), torch.zeros(T, 2), temperature=2.0)


def test_weights_of_a_plain_sample_are_the_empirical_frequencies():
    counts = torch.tensor([[6, 3, 1, 0], [0, 0, 0, 0]])
    lps = torch.tensor([[-0.5, -1.0, -3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for estimator in ("unbiased", "self_normalized"):  # the same when the proposal is the teacher itself
        w = sampled_log_weights(counts, lps, estimator=estimator).exp()
        torch.testing.assert_close(w[0], torch.tensor([0.6, 0.3, 0.1, 0.0], dtype=torch.float64))
        assert (w[1] == 0).all()  # no draws: no teacher entry (the position gets CE only)
    with pytest.raises(ValueError, match="proposal_log_z"):
        sampled_log_weights(counts, lps, proposal_temperature=2.0)
    with pytest.raises(ValueError, match="counts must be integers"):
        sampled_log_weights(counts.float(), lps)


@pytest.mark.parametrize("t, k", [(1, 1), (7, 3), (13, 9)])
def test_chunked_equals_the_float64_naive_reference_at_odd_shapes(t, k):
    g = torch.Generator().manual_seed(t * 100 + k)
    hidden = torch.randn(t, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(t)])
    counts = torch.randint(0, 5, (t, k), generator=g)
    counts[:, 0] += 1
    ids = torch.where(counts > 0, ids, -1)
    log_w = sampled_log_weights(counts, torch.randn(t, k, generator=g, dtype=torch.float64) - 3, estimator="unbiased")
    labels = torch.randint(0, V, (t,), generator=g)
    labels[0] = -100
    out = {}
    for impl in ("naive", "chunked"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, metrics = kd_loss(h, w, ids, log_w, labels, impl=impl, chunk_size=4, ce_weight=0.5, targets="sampled")
        loss.backward()
        out[impl] = (loss.detach(), h.grad, w.grad, metrics["teacher_tail_mass"])
    for a, b in zip(out["naive"], out["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert out["naive"][3] == 0  # sampled targets have no tail
    # the loss is the weighted cross-entropy of the samples: sum_j w_j (log w_j - log q_j) over trained rows
    logq = torch.log_softmax(hidden @ weight.T, -1)
    w = log_w.exp()
    kd = (w * (log_w.clamp(min=-1e300) - torch.gather(logq, 1, ids.clamp(min=0)))).where(ids >= 0, 0.0).sum(1)
    ce = -logq[torch.arange(t), labels.clamp(min=0)]
    trained = labels != -100
    want = ((kd + 0.5 * ce) * trained).sum() / trained.sum().clamp(min=1)
    torch.testing.assert_close(out["naive"][0], want, rtol=1e-10, atol=1e-12)


def test_sampled_targets_refuse_what_they_cannot_estimate():
    hidden, weight, teacher, labels = setup()
    ids = torch.arange(4).expand(T, 4)
    log_w = torch.full((T, 4), -math.log(4), dtype=torch.float64)
    for kw in ({"kind": "reverse_kl"}, {"tail": "bucket"}):
        with pytest.raises(ValueError, match="sampled targets estimate forward KL"):
            kd_loss(hidden, weight, ids, log_w, labels, targets="sampled", **kw)
    with pytest.raises(ValueError, match="targets must be one of"):
        kd_loss(hidden, weight, ids, log_w, labels, targets="gumbel")
    with pytest.raises(ValueError, match="cross-tokenizer KD takes top-k targets only"):
        xtok_loss(hidden, weight, ids, log_w, labels, targets="sampled")


def test_the_readme_example_runs_as_written():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("### Sampled teacher targets")[1].split("```python")[1].split("```")[0]
    scope = {}
    exec(block, scope)
    assert torch.isfinite(scope["loss"]) and scope["hidden"].grad is not None
