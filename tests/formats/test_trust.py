"""formats.trust: the read boundary's pieces on their own (the attacks through the public readers are in
test_hostile_cache.py): strict JSON, safe names, escaping, file kinds, bounded and hashed reads, and a remote
file's verified bytes being the ones parsed."""

from __future__ import annotations

import hashlib
import io
import os

import fsspec
import pytest

from formats.errors import ChecksumError, FormatError
from formats.trust import MAX_JSON_DEPTH, CacheFiles, check_name, exact_int, loads, printable


@pytest.mark.parametrize(
    "text,value",
    [
        ('{"a": [1, 2.5, null, true, "x"]}', {"a": [1, 2.5, None, True, "x"]}),
        ('"\\u00e9"', "é"),
        ("[]", []),
        ("-12", -12),
    ],
)
def test_loads_reads_ordinary_json(text, value):
    assert loads(text.encode(), "f", max_bytes=100) == value


@pytest.mark.parametrize(
    "raw,match",
    [
        (b'{"a": 1, "a": 1}', "appears twice"),
        (b"[NaN]", "NaN"),
        (b"[-Infinity]", "Infinity"),
        (b"[1e400]", "overflows"),
        (b"[" + b"1" * 41 + b"]", "digits"),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "deeper"),
        (b"\xff", "not UTF-8"),
        (b"{", "not valid JSON"),
        (b"x" * 1001, "more than the 1000"),
    ],
)
def test_loads_refuses_what_a_parser_would_resolve_silently_or_crash_on(raw, match):
    with pytest.raises(FormatError, match=match):
        loads(raw, "f", max_bytes=1000)


def test_loads_bounds_the_keys_of_an_object_only_when_asked():
    wide = "{" + ", ".join(f'"k{i}": {i}' for i in range(11)) + "}"
    assert len(loads(wide, "f", max_bytes=1000)) == 11  # a dataset's .json may be a large object
    assert len(loads(wide, "f", max_bytes=1000, max_keys=11)) == 11
    with pytest.raises(FormatError, match=r"^f: the JSON: an object of 11 keys \(at most 10 here"):
        loads('{"a": ' + wide + "}", "f", max_bytes=1000, max_keys=10)  # nested objects too


def test_exact_int_is_not_fooled_by_bool_or_float():
    assert exact_int(3) and not exact_int(True) and not exact_int(3.0)


@pytest.mark.parametrize("name", ["part-00000.parquet", "w012-part-00001.parquet", "tokenizer_config.json", "_x"])
def test_plain_names_pass(name):
    assert check_name(name, "f", "m") == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", ".hidden", "a/b", "a\\b", "%2e%2e", "x:y", "a b", "é", None, 3, "x" * 201]
)
def test_anything_else_is_refused(name):
    with pytest.raises(FormatError, match="points outside the cache folder or is not a plain file name"):
        check_name(name, "f", "m")


def test_printable_escapes_control_characters():
    assert printable("ok") == "ok"
    assert printable("a\x1b[2Jb\x07\r\n") == "a\\x1b[2Jb\\x07\\r\\n"
    assert printable("line\nnext", newlines=True) == "line\nnext"


def test_kinds_are_seen_without_following_links(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to(tmp_path / "f")
    os.mkfifo(tmp_path / "p")
    files = CacheFiles(tmp_path)
    assert [files.kind(n) for n in ("f", "d", "l", "p", "nope")] == ["file", "dir", "link", "other", None]
    assert dict(files.walk()) == {"d": "dir", "f": "file", "l": "link", "p": "other"}


def test_a_link_in_a_subfolder_path_is_not_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x.json").write_bytes(b"{}")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tokenizer").symlink_to(tmp_path / "real")
    with pytest.raises(FormatError):
        CacheFiles(tmp_path / "cache").read_bytes("tokenizer", "x.json", max_bytes=10)


def test_reads_are_bounded_and_hashed(tmp_path):
    data = b"0123456789"
    (tmp_path / "f").write_bytes(data)
    files, digest = CacheFiles(tmp_path), hashlib.sha256(data).hexdigest()
    assert files.read_bytes("f", max_bytes=10, size=10, sha256=digest) == data
    with pytest.raises(FormatError, match="more than the 9"):
        files.read_bytes("f", max_bytes=9)
    with pytest.raises(ChecksumError, match="manifest says 11"):
        files.read_bytes("f", max_bytes=100, size=11)
    with pytest.raises(ChecksumError, match="sha256"):
        files.read_bytes("f", max_bytes=100, sha256="0" * 64)
    with files.open("f", size=10, sha256=digest) as f:
        f.verify()
        assert f.read() == data and f.read(5) == b""


def test_a_remote_files_verified_bytes_are_the_ones_read():
    """Over fsspec the file is spooled while hashed; a server that changes it afterwards is not read again."""
    fs = fsspec.filesystem("memory")
    data = b"the original bytes"
    fs.pipe("/trust-remote/f", data)
    files = CacheFiles("memory://trust-remote")
    f = files.open("f", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    f.verify()
    fs.pipe("/trust-remote/f", b"THE OTHER BYTES!!!")  # same size, other content
    f.seek(0)
    assert f.read() == data
    copy = io.BytesIO()
    with pytest.raises(ChecksumError):
        files.copy_to(("f",), copy, size=len(data), sha256=hashlib.sha256(data).hexdigest())
