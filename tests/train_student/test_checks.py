"""train_student.checks: what the student would misread is refused, a thin teacher signal warned about."""

from __future__ import annotations

import json
import logging

import pytest

from .kd_fixtures import K, VOCAB, make_tokenizer
from formats import CacheReader
from formats.errors import IncompatibleCachesError, InputError
from train_student.checks import check_cache_fits_student, check_same_teacher, check_signal


def test_tokenizer_mismatch_is_refused(tiny):
    from formats.tokenizer_id import tokenizer_fingerprint

    manifest = CacheReader(tiny["cache"]).manifest
    same = make_tokenizer()
    check_cache_fits_student(
        manifest, "c", fingerprint=tokenizer_fingerprint(same), tokenizer_vocab=VOCAB, output_size=VOCAB
    )
    other = make_tokenizer(extra="x")  # same size, one token differs
    with pytest.raises(InputError, match="fingerprints differ"):
        check_cache_fits_student(
            manifest, "c", fingerprint=tokenizer_fingerprint(other), tokenizer_vocab=VOCAB, output_size=VOCAB
        )
    bigger = make_tokenizer(vocab=300)
    with pytest.raises(InputError, match="256 tokens .* has 300"):
        check_cache_fits_student(
            manifest, "c", fingerprint=tokenizer_fingerprint(bigger), tokenizer_vocab=300, output_size=300
        )
    with pytest.raises(InputError, match="LM head"):
        check_cache_fits_student(manifest, "c", fingerprint=None, tokenizer_vocab=None, output_size=100)


def test_thin_signal_warns(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="train_student"):
        info = check_signal(CacheReader(tiny["cache"]), "c")
    assert info["k"] == K and "k=8" in caplog.text
    assert 0.0 <= info["mean_tail_mass"] < 0.3


def test_cache_ids_are_compared_with_the_students_output_size(tiny, caplog):
    manifest = json.loads(json.dumps(CacheReader(tiny["cache"]).manifest))
    manifest["teacher"]["output_size"] = VOCAB + 64  # a padded output layer (OLMo 2, Qwen2.5)
    with caplog.at_level(logging.WARNING, logger="train_student"):
        check_cache_fits_student(manifest, "c", fingerprint=None, tokenizer_vocab=None, output_size=VOCAB)
    assert "320 rows" in caplog.text and "256" in caplog.text
    check_cache_fits_student(manifest, "c", fingerprint=None, tokenizer_vocab=None, output_size=VOCAB + 64)
    with pytest.raises(InputError, match="256 tokens.*only 200 rows"):
        check_cache_fits_student(manifest, "c", fingerprint=None, tokenizer_vocab=None, output_size=200)


def test_a_stage_that_mixes_teachers_is_refused_unless_allowed(tiny, caplog):
    manifest = CacheReader(tiny["cache"]).manifest
    other = json.loads(json.dumps(manifest))
    other["teacher"]["name_or_path"] = "another/teacher"
    check_same_teacher([manifest, manifest], ["a", "b"], "s1", allow_mixed=False)
    with pytest.raises(
        IncompatibleCachesError, match="stage s1: b and a come from different teachers.*teacher.name_or_path"
    ):
        check_same_teacher([manifest, other], ["a", "b"], "s1", allow_mixed=False)
    with caplog.at_level(logging.WARNING, logger="train_student"):
        check_same_teacher([manifest, other], ["a", "b"], "s1", allow_mixed=True)
    assert "mixes teachers" in caplog.text
