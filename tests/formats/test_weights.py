"""formats/weights.py: the sha256 of a model's weight files, per file (what a cache records of its teacher) and
as one digest (the same for `kdcache eval`'s model_sha256), streamed and computed once per unchanged file."""

from __future__ import annotations

import hashlib

import pytest

from formats import weights
from formats.errors import InputError


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"\x01" * 5000)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"\x02" * 300)
    (folder / "config.json").write_text("{}")  # not a weight file
    (folder / "sub").mkdir()
    (folder / "sub" / "other.safetensors").write_bytes(b"\x03")  # not at the top level: not this model's
    return folder


def test_each_weight_file_is_hashed_as_sha256sum_would(model):
    assert weights.weight_file_hashes(model) == {
        name: hashlib.sha256((model / name).read_bytes()).hexdigest()
        for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    }


def test_the_digest_is_over_names_and_hashes_and_follows_the_weights(model):
    files = weights.weight_file_hashes(model)
    expected = hashlib.sha256("".join(f"{n}\0{files[n]}\n" for n in sorted(files)).encode()).hexdigest()
    assert weights.weights_sha256(model) == expected == weights.combined_sha256(files)
    (model / "config.json").write_text('{"a": 1}')
    assert weights.weights_sha256(model) == expected
    (model / "model-00002-of-00002.safetensors").write_bytes(b"\x02" * 301)  # new size: hashed again
    assert weights.weights_sha256(model) != expected


def test_an_unchanged_file_is_hashed_once_per_process(model, monkeypatch):
    weights._hashes.cache_clear()
    calls = []
    real = weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda p: calls.append(p) or real(p))
    first = weights.weight_file_hashes(model)
    assert weights.weight_file_hashes(model) == first and len(calls) == 2


def test_a_folder_without_weight_files_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"no weight files \(.safetensors, .bin"):
        weights.weight_file_hashes(tmp_path)
