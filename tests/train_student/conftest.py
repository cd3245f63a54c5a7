"""Fixtures for the trainer tests (helpers live in kd_fixtures.py: `from .kd_fixtures import ...`)."""

from __future__ import annotations

import pytest

from .kd_fixtures import make_model, make_tokenizer, save_model, write_cache


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths: teacher (random, peaked), student (random init, another seed), cache (48 examples of
    the teacher's top-8, row groups of ~2 examples so 2 ranks each get a partition)."""
    root = tmp_path_factory.mktemp("tiny-kd")
    tok = make_tokenizer()
    teacher = make_model(seed=1, scale=0.12)
    teacher.eval()
    paths = {
        "teacher": save_model(teacher, tok, root / "teacher"),
        "student": save_model(make_model(seed=2), tok, root / "student"),
        "cache": write_cache(teacher, tok, root / "cache", n=48, row_group_positions=40),
        "root": root,
    }
    return paths
