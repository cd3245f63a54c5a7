"""train_student.config: settings from a YAML file and flags (defaults < YAML < flags)."""
from __future__ import annotations

from train_student.config import make_config

from .kd_fixtures import REPO


def test_flags_override_the_file():
    two = make_config(REPO / "configs" / "train" / "two_stage.yaml", lr=1e-3)  # flags override the file
    assert two.lr == 1e-3 and [s.name for s in two.resolved_stages()] == ["generated", "human"]
