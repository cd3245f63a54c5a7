"""formats.safe_write: files appear complete or not at all, never through a planted link; one job per folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from formats.errors import InputError
from formats.safe_write import AtomicFile, FolderLock, make_folder, write_json_atomic, write_text_atomic


def test_a_planted_symlink_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "README.md").symlink_to(victim)
    write_text_atomic(tmp_path / "c" / "README.md", "card")
    assert victim.read_text() == "precious" and not (tmp_path / "c" / "README.md").is_symlink()
    assert (tmp_path / "c" / "README.md").read_text() == "card"


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), AtomicFile(tmp_path, "x.json") as f:
        f.write(b"half")
        raise RuntimeError("disk gone")
    assert list(tmp_path.iterdir()) == []


def test_json_round_trips_and_names_must_be_plain(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(InputError, match="plain file names"):
        AtomicFile(tmp_path, "../escape")


def test_make_folder_refuses_a_file_or_a_link(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "l").symlink_to(tmp_path)
    for name in ("f", "l"):
        with pytest.raises(InputError, match="not a folder"):
            make_folder(tmp_path / name)
    assert make_folder(tmp_path / "new" / "deeper").is_dir()


def test_a_second_process_cannot_take_a_held_lock(tmp_path):
    lock = FolderLock(tmp_path / "c")
    code = (
        "import sys; from formats.safe_write import FolderLock; from formats.errors import InputError\n"
        "try:\n    FolderLock(sys.argv[1])\nexcept InputError as e:\n    print(e)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "c")],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert f"is being written by pid {os.getpid()}" in r.stdout, r.stderr
    lock.release(remove=True)
    assert not (tmp_path / "c" / ".kdcache-lock").exists()
    FolderLock(tmp_path / "c").release()  # free again
