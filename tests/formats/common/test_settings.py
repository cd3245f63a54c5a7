"""formats.common.settings: flags, YAML reading and the defaults < YAML < flags merge, generated from one
dataclass declaration (both stages' configs are built on it)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from dataclasses import dataclass

import pytest

from formats.errors import InputError
from formats.common.settings import add_flags, check_choices, convert, flags_given, merge, read_yaml, setting


@dataclass
class Inner:
    path: list[str] = setting(default_factory=list, group="inner", help="paths")
    weight: float = setting(1.0, help="a weight")
    label: str = setting("", flag=False, help="not a flag")


@dataclass
class Outer:
    k: int = setting(64, group="numbers", help="top k")
    mass: float | None = setting(None, help="a mass", metavar="P")
    mode: str = setting("score", choices=("score", "generate"), help="the mode")
    fast: bool = setting(True, help="go fast")
    eager: bool | None = setting(None, help="eager or not")
    share: float = setting(0.5, help="a share (50% = 0.5)")
    layers: list[int] | None = setting(None, group="lists", help="layers", metavar="I,J")
    inner: list[Inner] = setting(default_factory=list, flag=False, help="nested")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flags(p, Outer, Inner)
    return p


def test_flags_are_generated_from_the_fields():
    p = _parser()
    text = p.format_help()
    for flag in (
        "--config FILE.yaml",
        "--k K",
        "--mass P",
        "--mode {score,generate}",
        "--fast, --no-fast",
        "--eager, --no-eager",
        "--layers I,J",
        "--path PATH",
        "--weight WEIGHT",
    ):
        assert flag in text, flag
    assert "--label" not in text and "--inner" not in text  # flag=False
    assert "top k (default: 64)" in text and "go fast (default: on)" in text and "a mass\n" in text
    assert "(50% = 0.5) (default: 0.5)" in " ".join(text.split())
    titles = [g.title for g in p._action_groups]
    assert {"numbers", "lists", "inner"} <= set(titles)
    assert all(a.help for a in p._actions)


def test_absent_flags_are_none_and_given_ones_are_typed():
    args = _parser().parse_args(["--k", "5", "--no-fast", "--layers", "0,5", "--layers", "9", "--path", "a"])
    assert flags_given(args, Outer, Inner) == {"k": 5, "fast": False, "layers": ["0", "5", "9"], "path": ["a"]}
    assert flags_given(_parser().parse_args([]), Outer, Inner) == {}
    with pytest.raises(SystemExit):
        _parser().parse_args(["--mode", "other"])


def test_merge_defaults_yaml_flags(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("k: 8\nmass: 1e-1\nlayers: 1,2\ninner:\n  - {path: a, weight: 2}\n  - {path: [b, c]}\n")
    values = merge((Outer,), f, {"k": 16, "mass": None, "fast": False})
    assert values == {
        "k": 16,
        "mass": 0.1,
        "fast": False,
        "layers": [1, 2],
        "inner": [Inner(path=["a"], weight=2.0), Inner(path=["b", "c"])],
    }
    assert Outer(**values).mode == "score"  # defaults stay the dataclass's
    assert merge((Outer, Inner), None, {"layers": ["0", "5"], "weight": 3}) == {"layers": [0, 5], "weight": 3.0}


@pytest.mark.parametrize(
    "text, match",
    [
        ("k: many\n", r"config file .*s\.yaml: k: expected an integer, got 'many'"),
        ("k: true\n", r"k: expected an integer, got True"),
        ("fast: 'yes'\n", r"fast: expected true or false, got 'yes'"),
        ("mode: [a]\n", r"mode: expected a string, got \['a'\]"),
        ("k: null\n", r"k: must be set \(got null\)"),
        ("layers: {a: 1}\n", r"layers: expected a list"),
        ("layers: [1, x]\n", r"layers\[1\]: expected an integer, got 'x'"),
        ("inner: [3]\n", r"inner\[0\]: expected a mapping of Inner settings"),
        ("inner: [{bogus: 1}]\n", r"s\.yaml, inner\[0\]: unknown settings bogus; known: label, path, weight"),
        ("bogus: 1\nother: 2\n", r"s\.yaml: unknown settings bogus, other; known: eager, fast, inner, k, layers"),
        ("- k\n", r"must hold a mapping of setting: value, got list"),
        ("k: [unclosed\n", r"s\.yaml is not valid YAML"),
    ],
)
def test_a_broken_or_hostile_file_is_an_input_error_naming_file_and_key(tmp_path, text, match):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(InputError, match=match):
        merge((Outer,), f, {})


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match=r"config file .*missing\.yaml does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="does not exist"):
        read_yaml(tmp_path)  # a folder
    binary = tmp_path / "b.yaml"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(InputError, match="not valid YAML"):
        read_yaml(binary)
    empty = tmp_path / "e.yaml"
    empty.write_text("# only a comment\n")
    assert read_yaml(empty) == {}


def test_unknown_flags_and_choices():
    with pytest.raises(InputError, match=r"flags: unknown settings bogus"):
        merge((Outer,), None, {"bogus": 1})
    with pytest.raises(InputError, match=r"stage 1: mode='other' is not one of score, generate"):
        check_choices(Outer(mode="other"), "stage 1: ")
    check_choices(Outer())


def test_convert_keeps_instances_of_nested_dataclasses():
    inner = Inner(path=["x"])
    assert convert({"inner": [inner]}, {"inner": list[Inner]}, "here") == {"inner": [inner]}


def test_importing_it_stays_light():
    """`kdcache --help` imports every cli.py, hence this module: no YAML, torch or transformers."""
    code = "import sys, formats.common.settings; print(sorted(m for m in ('yaml', 'torch', 'transformers', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_setting_field_has_help():
    from cache_teacher.config import CacheConfig
    from train_student.config import Stage, TrainConfig

    for cls in (CacheConfig, TrainConfig, Stage):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name}"
