"""cache_teacher.config: settings from a YAML file and flags (defaults < YAML < flags)."""
from __future__ import annotations

import pytest

from cache_teacher.config import make_config as make_raw_config
from formats.errors import InputError


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher: t\nout: o\nk: 16\nsources: [a, b]\nmode: generate\n")
    c = make_raw_config(cfg, k=32, mode=None)
    assert (c.k, c.mode, c.sources, c.teacher) == (32, "generate", ["a", "b"], "t")
    cfg.write_text("teacher: t\nbogus: 1\n")
    with pytest.raises(InputError, match="bogus"):
        make_raw_config(cfg)
    with pytest.raises(InputError, match="engine"):
        make_raw_config(None, teacher="t", out="o", engine="tensorrt")
