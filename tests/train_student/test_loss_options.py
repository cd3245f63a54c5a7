"""train_student.loss_options.LossSpec: the loss settings, typed and validated once, from a stage to the loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from train_student.config import make_config
from train_student.loss import kd_loss, student_loss
from train_student.loss_options import LossSpec


def test_a_stage_becomes_one_spec_and_evaluation_scores_plain_forward_kl():
    cfg = make_config(
        student="s",
        cache=["c"],
        kd_weight=0.5,
        ce_weight=0.25,
        temperature=2.0,
        kind="reverse_kl",
        tail="bucket",
        impl="naive",
        chunk_size=7,
    )
    stage = cfg.resolved_stages()[0]
    spec = LossSpec.for_stage(stage, cfg)
    assert (spec.kd_weight, spec.ce_weight, spec.temperature, spec.kind, spec.tail, spec.impl, spec.chunk_size) == (
        0.5,
        0.25,
        2.0,
        "reverse_kl",
        "bucket",
        "naive",
        7,
    )
    ev = spec.for_evaluation()
    assert (ev.kd_weight, ev.ce_weight, ev.temperature, ev.kind, ev.tail) == (1.0, 1.0, 1.0, "forward_kl", "bucket")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.temperature = 3.0  # built once


@pytest.mark.parametrize(
    "bad",
    [
        dict(kind="kl"),
        dict(tail="x"),
        dict(impl="cuda"),
        dict(cross_tokenizer="on"),
        dict(temperature=0.0),
        dict(kd_weight=-1.0),
        dict(ce_weight=float("nan")),
        dict(chunk_size=0),
    ],
)
def test_bad_settings_are_refused_when_the_spec_is_built(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LossSpec(**bad)


def test_student_loss_runs_the_loss_the_spec_names():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(20, 8, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 20, (6, 4), generator=g)
    lps = torch.log_softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), -1) - 0.1
    labels = torch.randint(0, 20, (6,), generator=g)
    spec = LossSpec(kd_weight=1.0, ce_weight=0.5, temperature=2.0, impl="naive")
    got, _ = student_loss(spec, h, w, ids, lps, labels)
    want, _ = kd_loss(h, w, ids, lps, labels, kd_weight=1.0, ce_weight=0.5, temperature=2.0, impl="naive")
    assert torch.equal(got, want)
