"""train_student.cli: `kdcache train --help`, and a bad config file as a one-line error."""
from __future__ import annotations

import pytest

from train_student.__main__ import main as train_main

from .kd_fixtures import PYTHON, REPO, python_env


@pytest.mark.multiprocess
def test_cli_help_and_bad_config(tmp_path, capsys):
    import subprocess

    out = subprocess.run([PYTHON, "-m", "kdcache.cli", "train", "--help"], env=python_env(),
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "--init-from-teacher" in out.stdout and "--kd-weight" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: x\ncache: y\nlearning_rate: 1\n")
    assert train_main(["train", "--config", str(bad)]) == 1
    assert "unknown config keys ['learning_rate']" in capsys.readouterr().err
