"""Checkpoint files: loaded with torch.load(weights_only=True) only, RNG states round-trip as plain types."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from formats.errors import InputError
from train_student import checkpoint

RAN = []


class _Payload:
    """Unpickling this runs code: what a tampered checkpoint would carry."""

    def __reduce__(self):
        return (RAN.append, ("payload ran",))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    torch.save({"step": 3, "ranks": [{"data": _Payload()}]}, tmp_path / "trainer.pt")
    with pytest.raises(InputError, match="trainer.pt.*refused"):
        checkpoint.load_trainer_state(tmp_path)
    assert RAN == []


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # numpy keeps a cached gaussian: part of the state
    torch.save({"ranks": [{"rng": checkpoint.rng_state()}]}, tmp_path / "trainer.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.set_rng_state(checkpoint.load_trainer_state(tmp_path)["ranks"][0]["rng"])
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
