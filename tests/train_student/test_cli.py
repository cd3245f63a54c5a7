"""train_student.cli: `kdcache train --help` (generated from TrainConfig and Stage), flags, and a bad config
file as a one-line error."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from train_student.__main__ import main as train_main

from .kd_fixtures import PYTHON, REPO, python_env


def _train_parser() -> argparse.ArgumentParser:
    from train_student.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser


def test_help_documents_every_setting_of_the_run_and_of_its_stage():
    from train_student.config import Stage, TrainConfig

    train = _train_parser()._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    for cls in (TrainConfig, Stage):
        for f in dataclasses.fields(cls):
            if f.name not in ("stages", "name"):  # YAML only: the list of stages, a stage's name
                assert "--" + f.name.replace("_", "-") in text, f.name
    assert all(a.help for a in train._actions)


def test_flags_make_the_single_stage():
    from train_student.cli import config_from_args

    args = _train_parser().parse_args(
        [
            "train",
            "--student",
            "s",
            "--cache",
            "a",
            "--cache",
            "b,c",
            "--kd-weight",
            "0",
            "--ce-weight",
            "1",
            "--no-shuffle",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.shuffle, [s.cache for s in cfg.stages]) == (False, [["a", "b", "c"]])
    assert (cfg.stages[0].kd_weight, cfg.stages[0].ce_weight) == (0.0, 1.0)
    args = _train_parser().parse_args(
        ["train", "--init-from-teacher", "t", "--keep-layers", "0,5", "--keep-layers", "9", "--cache", "a"]
    )
    assert config_from_args(args).keep_layers == [0, 5, 9]


@pytest.mark.multiprocess
def test_cli_help_and_bad_config(tmp_path, capsys):
    import subprocess

    out = subprocess.run(
        [PYTHON, "-m", "kdcache.cli", "train", "--help"], env=python_env(), capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0 and "--init-from-teacher" in out.stdout and "--kd-weight" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: x\ncache: y\nlearning_rate: 1\n")
    assert train_main(["train", "--config", str(bad)]) == 1
    assert "bad.yaml: unknown settings learning_rate; known: " in capsys.readouterr().err
