"""formats.common.cli.run_command: a KDCacheError or an operational OSError is one line on stderr (what, where,
what to do) and exit 1; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import errno
import os

import pytest

from formats.common.cli import OS_ERROR_HINTS, run_command
from formats.errors import InputError


def run(func):
    args = argparse.Namespace(func=func, command="cache")
    return run_command(argparse.ArgumentParser(), args, "kdcache")


@pytest.mark.parametrize("code", sorted(OS_ERROR_HINTS))
def test_an_operational_error_is_one_line_naming_the_path_and_the_fix(code, capsys):
    def fail(_):
        raise OSError(code, os.strerror(code), "/data/out/part-00003.parquet")

    assert run(fail) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/data/out/part-00003.parquet" in err and OS_ERROR_HINTS[code] in err
    assert err.startswith(f"kdcache cache: error: {os.strerror(code)}")


def test_a_kdcache_error_is_one_line(capsys):
    def fail(_):
        raise InputError("what, where, how to fix")

    assert run(fail) == 1 and capsys.readouterr().err == "kdcache cache: error: what, where, how to fix\n"


def test_other_errors_keep_their_traceback():
    def fail(_):
        raise OSError(errno.ECONNRESET, "reset")

    with pytest.raises(OSError):
        run(fail)
    with pytest.raises(KeyError):
        run(lambda _: {}["bug"])


def test_train_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")

    def train(_):
        (tmp_path / "afile").mkdir(parents=True, exist_ok=True)  # what the trainer does with --out

    assert run(train) == 1 and "afile" in capsys.readouterr().err
