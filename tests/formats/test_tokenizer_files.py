"""The teacher's tokenizer in the cache (formats/tokenizer_files.py): round trip, verify catches each
tamper, hostile manifest entries are refused, `kdcache add-tokenizer` for caches written before."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest

from formats.errors import ChecksumError, FormatError, IncompatibleCachesError, InputError
from formats.manifest import load_manifest
from formats.tokenizer_files import TOKENIZER_DIR, add_tokenizer, load_cache_tokenizer, save_tokenizer_files
from formats.tokenizer_id import tokenizer_info
from formats.tools import merge_caches, verify_cache

from ..tokenizer_helpers import tiny_tokenizer
from .format_helpers import PROVENANCE, edit_manifest, make_example, write_cache


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(out)
    return out


def old_cache(path, tokenizer, rng, n=6, **kw):
    """A cache as written before tokenizer files were stored: the manifest records the tokenizer's identity only."""
    write_cache(
        path,
        [make_example(rng, i, **kw) for i in range(n)],
        output_size=1000,  # the examples' ids go up to 1000
        provenance={**PROVENANCE, "tokenizer": tokenizer_info(tokenizer, "tiny")},
    )
    return path


@pytest.fixture
def cache(tmp_path, tokenizer, tokenizer_dir, rng):
    path = old_cache(tmp_path / "cache", tokenizer, rng)
    add_tokenizer(path, str(tokenizer_dir))
    return path


def test_round_trip(cache, tokenizer):
    manifest = load_manifest(cache)
    names = sorted(e["file"] for e in manifest["tokenizer_files"])
    assert names == sorted(p.name for p in (cache / TOKENIZER_DIR).iterdir())
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    assert verify_cache(cache)["tokenizer_files"] == len(names)
    loaded = load_cache_tokenizer(cache)
    assert loaded.get_vocab() == tokenizer.get_vocab() and loaded.chat_template == tokenizer.chat_template


def test_save_replaces_what_a_killed_job_left(tmp_path, tokenizer):
    (tmp_path / TOKENIZER_DIR).mkdir()
    (tmp_path / TOKENIZER_DIR / "stale.txt").write_text("from a killed run")
    (tmp_path / ".tokenizer.partial").mkdir()
    entries = save_tokenizer_files(tokenizer, tmp_path)
    assert sorted(p.name for p in (tmp_path / TOKENIZER_DIR).iterdir()) == sorted(e["file"] for e in entries)
    assert not (tmp_path / ".tokenizer.partial").exists()


def _flip_byte(folder: Path):
    path = folder / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _symlink_file(folder: Path):
    path = folder / "tokenizer_config.json"
    outside = folder.parent.parent / "outside.json"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    os.symlink(outside, path)


def _symlink_folder(folder: Path):
    moved = folder.parent.parent / "elsewhere"
    folder.rename(moved)
    os.symlink(moved, folder)


TAMPERS = {  # name -> (edit of the cache's tokenizer/ folder, error type, text the message must hold)
    "changed": (_flip_byte, ChecksumError, "tokenizer.json: sha256"),
    "truncated": (
        lambda f: (f / "tokenizer.json").write_bytes((f / "tokenizer.json").read_bytes()[:-7]),
        ChecksumError,
        "tokenizer.json: ",
    ),
    "missing": (lambda f: (f / "tokenizer_config.json").unlink(), FormatError, "tokenizer_config.json: missing"),
    "extra": (lambda f: (f / "added_tokens.json").write_text("{}"), FormatError, "added_tokens.json: not listed"),
    "symlinked file": (_symlink_file, FormatError, "tokenizer_config.json: a symlink"),
    "symlinked folder": (_symlink_folder, FormatError, "tokenizer: a symlink"),
    "folder removed": (lambda f: [p.unlink() for p in f.iterdir()] and f.rmdir(), FormatError, "tokenizer: missing"),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_verify_catches_each_tamper(cache, tamper):
    edit, error, text = TAMPERS[tamper]
    edit(cache / TOKENIZER_DIR)
    with pytest.raises(error, match=text.replace(".", r"\.")):
        verify_cache(cache)
    with pytest.raises(error):
        load_cache_tokenizer(cache)


def test_a_folder_the_manifest_does_not_list_is_refused(tmp_path, tokenizer, rng):
    path = old_cache(tmp_path / "c", tokenizer, rng)
    (path / TOKENIZER_DIR).mkdir()
    with pytest.raises(FormatError, match="lists no tokenizer_files, yet the folder exists"):
        verify_cache(path)


HOSTILE = {  # a manifest entry -> the text of the refusal
    "parent": ({"file": "../manifest.json"}, r"tokenizer_files\[0\]\.file '\.\./manifest\.json' points outside"),
    "absolute": ({"file": "/etc/passwd"}, r"tokenizer_files\[0\]\.file '/etc/passwd' points outside"),
    "subfolder": ({"file": "a/b.json"}, "points outside"),
    "url": ({"file": "s3://bucket/x"}, "points outside"),
    "empty": ({"file": ""}, "points outside"),
    "huge": ({"bytes": 1 << 40}, r"tokenizer_files\[0\]\.bytes is 1099511627776: must be an integer in 0\.\."),
    "negative": ({"bytes": -1}, r"tokenizer_files\[0\]\.bytes"),
    "not a number": ({"bytes": "12"}, r"tokenizer_files\[0\]\.bytes"),
    "bad sha": ({"sha256": "00"}, r"tokenizer_files\[0\]\.sha256"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_manifest_entries_are_refused(cache, case):
    change, text = HOSTILE[case]
    edit_manifest(cache, lambda m: m["tokenizer_files"][0].update(change))
    for action in (load_manifest, verify_cache, load_cache_tokenizer):
        with pytest.raises(FormatError, match=text):
            action(cache)


@pytest.mark.parametrize(
    "value, text",
    [({"file": "x"}, "must be a list"), ([], "must be a list"), (["x"], r"tokenizer_files\[0\] must be an object")],
)
def test_a_malformed_list_is_refused(cache, value, text):
    edit_manifest(cache, lambda m: m.update(tokenizer_files=value))
    with pytest.raises(FormatError, match=text):
        load_manifest(cache)


def test_a_file_listed_twice_is_refused(cache):
    edit_manifest(cache, lambda m: m["tokenizer_files"].append(dict(m["tokenizer_files"][0])))
    with pytest.raises(FormatError, match="listed twice"):
        load_manifest(cache)


def test_files_of_another_tokenizer_are_refused_by_their_fingerprint(cache):
    other = tiny_tokenizer(extra_specials=("<other>",))
    entries = save_tokenizer_files(other, cache)  # consistent checksums, wrong tokenizer
    edit_manifest(cache, lambda m: m.update(tokenizer_files=entries))
    # the files are what the manifest lists, but not the tokenizer the cache was made with
    for action in (verify_cache, load_cache_tokenizer):
        with pytest.raises(FormatError, match="another fingerprint"):
            action(cache)


def test_remote_cache(cache, tokenizer):
    fs = fsspec.filesystem("memory")
    fs.put(str(cache), "/tok-cache", recursive=True)
    assert verify_cache("memory://tok-cache")["tokenizer_files"] > 0
    assert load_cache_tokenizer("memory://tok-cache").get_vocab() == tokenizer.get_vocab()
    with fs.open("/tok-cache/tokenizer/tokenizer.json", "wb") as f:
        f.write(b"{}")
    with pytest.raises(ChecksumError, match="tokenizer.json"):
        load_cache_tokenizer("memory://tok-cache")


# ---- caches written before: add-tokenizer ---------------------------------------------------------


def test_an_old_cache_is_told_the_command_that_adds_the_files(tmp_path, tokenizer, rng):
    path = old_cache(tmp_path / "old", tokenizer, rng)
    assert verify_cache(path)["tokenizer_files"] == 0  # still a valid cache
    with pytest.raises(InputError, match=f"kdcache add-tokenizer {path} --tokenizer tiny"):
        load_cache_tokenizer(path)


def test_add_tokenizer_refuses_another_tokenizer(tmp_path, tokenizer, rng):
    path = old_cache(tmp_path / "old", tokenizer, rng)
    before = (path / "manifest.json").read_bytes()
    other = tmp_path / "other"
    tiny_tokenizer(extra_specials=("<other>",)).save_pretrained(other)
    with pytest.raises(IncompatibleCachesError, match="fingerprint .* differs"):
        add_tokenizer(path, str(other))
    templated = tmp_path / "templated"
    tiny_tokenizer(template="{{ messages[0]['content'] }}").save_pretrained(templated)
    with pytest.raises(IncompatibleCachesError, match="chat_template_sha256"):
        add_tokenizer(path, str(templated))
    assert (path / "manifest.json").read_bytes() == before and not (path / TOKENIZER_DIR).exists()


def test_add_tokenizer_cli_then_verify(tmp_path, tokenizer, tokenizer_dir, rng, capsys):
    from kdcache.cli import main

    path = old_cache(tmp_path / "old", tokenizer, rng)
    assert main(["add-tokenizer", str(path), "--tokenizer", str(tokenizer_dir)]) == 0
    assert main(["verify", str(path)]) == 0
    assert "tokenizer files" in capsys.readouterr().out
    assert main(["add-tokenizer", str(path), "--tokenizer", str(tokenizer_dir)]) == 1  # already there
    assert "already carries" in capsys.readouterr().err
    assert load_cache_tokenizer(path).get_vocab() == tokenizer.get_vocab()


def test_merge_carries_the_tokenizer_files(tmp_path, tokenizer, tokenizer_dir, rng):
    a = old_cache(tmp_path / "a", tokenizer, rng, n=3)
    b = tmp_path / "b"
    write_cache(
        b,
        [make_example(rng, i, prefix="b") for i in range(3)],
        output_size=1000,
        provenance={**PROVENANCE, "tokenizer": load_manifest(a)["tokenizer"]},
    )
    add_tokenizer(a, str(tokenizer_dir))
    add_tokenizer(b, str(tokenizer_dir))
    merged = merge_caches(tmp_path / "merged", [a, b])
    assert merged["tokenizer_files"] == load_manifest(a)["tokenizer_files"]
    assert verify_cache(tmp_path / "merged")["tokenizer_files"] == len(merged["tokenizer_files"])
    assert load_cache_tokenizer(tmp_path / "merged").get_vocab() == tokenizer.get_vocab()


def test_inspect_names_the_tokenizer_files(cache, tmp_path, tokenizer, rng, capsys):
    from kdcache.cli import main

    assert main(["inspect", str(cache)]) == 0
    assert f"{len(load_manifest(cache)['tokenizer_files'])} in tokenizer/" in capsys.readouterr().out
    assert main(["inspect", str(old_cache(tmp_path / "old", tokenizer, rng))]) == 0
    assert "none (a student with another tokenizer needs them: kdcache add-tokenizer)" in capsys.readouterr().out
