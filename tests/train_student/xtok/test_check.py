"""The student check (train_student/xtok/check.py): which path a student's tokenizer takes."""

from __future__ import annotations

import pytest

from formats.errors import InputError
from formats.tokenizer_id import tokenizer_info
from train_student.loss_options import CROSS_TOKENIZER_MODES
from train_student.xtok.check import AUTO_METHOD, check_student_tokenizer

from ...tokenizer_helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def teacher():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def student():
    return tiny_tokenizer(bos="<bos>", eos="<eos>", template=None)


def manifest(teacher, *, files=True, messages=True) -> dict:
    m = {"tokenizer": tokenizer_info(teacher, "teacher-tok"), "extra": {"template": {"messages_in_meta": messages}}}
    if files:
        m["tokenizer_files"] = [{"file": "tokenizer.json", "bytes": 1, "sha256": "0" * 64}]
    return m


def test_same_tokenizer(teacher):
    assert check_student_tokenizer(manifest(teacher), teacher, "auto") == "off"
    assert check_student_tokenizer(manifest(teacher), teacher, "off") == "off"
    assert (
        check_student_tokenizer(manifest(teacher, files=False, messages=False), teacher, "auto") == "off"
    )  # old caches
    assert check_student_tokenizer(manifest(teacher), teacher, "exact-map") == "exact-map"  # the identity case


def test_another_tokenizer(teacher, student):
    assert check_student_tokenizer(manifest(teacher), student, "auto") == AUTO_METHOD
    for mode in ("exact-map", "uld", "hybrid"):
        assert check_student_tokenizer(manifest(teacher), student, mode) == mode
    with pytest.raises(InputError, match="not the teacher's .*Pass --cross-tokenizer auto"):
        check_student_tokenizer(manifest(teacher), student, "off")


def test_an_old_cache_says_what_to_do(teacher, student):
    with pytest.raises(InputError, match="kdcache add-tokenizer caches/c --tokenizer teacher-tok"):
        check_student_tokenizer(manifest(teacher, files=False), student, "auto", cache="caches/c")
    with pytest.raises(InputError, match="does not store its conversations"):
        check_student_tokenizer(manifest(teacher, messages=False), student, "hybrid")


def test_an_unknown_mode(teacher):
    assert CROSS_TOKENIZER_MODES == ("off", "auto", "exact-map", "uld", "hybrid")
    with pytest.raises(InputError, match="--cross-tokenizer 'on': must be one of off, auto"):
        check_student_tokenizer(manifest(teacher), teacher, "on")
