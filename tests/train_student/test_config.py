"""train_student.config: settings from a YAML file and flags (defaults < YAML < flags)."""

from __future__ import annotations

import pytest

from formats.errors import InputError
from train_student.config import make_config

from .kd_fixtures import REPO


def test_flags_override_the_file():
    two = make_config(REPO / "configs" / "train" / "two_stage.yaml", lr=1e-3)  # flags override the file
    assert two.lr == 1e-3 and [s.name for s in two.resolved_stages()] == ["generated", "human"]


def test_validate_returns_the_config_like_the_cache_stage():
    cfg = make_config(student="s", cache=["c"])
    assert cfg.validate() is cfg


def test_the_shorthand_is_one_stage_not_a_second_copy_of_the_stage_fields(tmp_path):
    import dataclasses

    from train_student.config import Stage, TrainConfig

    stage_fields = {f.name for f in dataclasses.fields(Stage)}
    assert not stage_fields & {f.name for f in dataclasses.fields(TrainConfig)}  # nested, not copied
    cfg = make_config(student="s", cache="a", kd_weight=0.0, ce_weight=1.0, tail="bucket")
    assert cfg.stages == [Stage(cache=["a"], kd_weight=0.0, ce_weight=1.0, tail="bucket", name="stage0")]


def test_stage_settings_at_the_top_level_and_in_stages_is_an_error(tmp_path):
    """Before, the top-level value was silently ignored when `stages:` was given."""
    with pytest.raises(InputError, match=r"two_stage\.yaml.*kd_weight.*stages"):
        make_config(REPO / "configs" / "train" / "two_stage.yaml", kd_weight=0.0)


def test_wrongly_typed_values_name_the_file_and_the_key(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("student: s\ncache: c\nlr: fast\n")
    with pytest.raises(InputError, match=r"t\.yaml.*\blr\b.*fast"):
        make_config(cfg)
    cfg.write_text("student: s\nstages:\n  - {cache: c, steps: ten}\n")
    with pytest.raises(InputError, match=r"t\.yaml.*stages\[0\].*steps.*ten"):
        make_config(cfg)
    cfg.write_text("student: s\ncache: c\nlr: 1e-5\n")  # PyYAML reads 1e-5 (no dot) as a string
    assert make_config(cfg).lr == 1e-5


def test_file_errors_use_the_same_words_as_the_cache_stage(tmp_path):
    with pytest.raises(InputError, match=r"config file .*nope\.yaml does not exist"):
        make_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: x\ncache: y\nlearning_rate: 1\n")
    with pytest.raises(InputError, match=r"config file .*bad\.yaml: unknown settings learning_rate; known: "):
        make_config(bad)
    bad.write_text("student: x\nstages:\n  - {cache: y, learning_rate: 1}\n")
    with pytest.raises(InputError, match=r"config file .*bad\.yaml, stages\[0\]: unknown settings learning_rate"):
        make_config(bad)
