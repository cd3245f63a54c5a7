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


def test_a_wrongly_typed_value_in_the_file_names_file_and_setting(tmp_path):
    """A hostile/broken YAML value is a typed InputError naming the file and the key, not a TypeError."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher: t\nout: o\nk: many\n")
    with pytest.raises(InputError, match=r"c\.yaml.*\bk\b.*many"):
        make_raw_config(cfg)
    cfg.write_text("teacher: t\nout: o\nfraction: [0.5]\n")
    with pytest.raises(InputError, match=r"c\.yaml.*fraction"):
        make_raw_config(cfg)


def test_a_missing_or_malformed_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"config file .*nope\.yaml does not exist"):
        make_raw_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- k\n- 5\n")
    with pytest.raises(InputError, match=r"config file .*list\.yaml must hold a mapping"):
        make_raw_config(bad)
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(InputError, match=r"config file .*list\.yaml is not valid YAML"):
        make_raw_config(bad)
