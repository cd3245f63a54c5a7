"""kdcache.study.cli: the `eval`, `report` and `plot` subcommands through `kdcache.cli.main` (flags,
defaults, what each handler passes on and prints, the one-line error of --out with several targets).
`eval` runs with `kdcache.study.evaluate.evaluate` replaced by a recorder (lm-evaluation-harness and a
model are tests/kdcache/study/test_evaluate.py's business); `report` and `plot` run for real on
fabricated run folders (test_report.py's)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kdcache.cli import main
from kdcache.study import cli as study_cli
from kdcache.study import evaluate as ev

from .test_report import fake_run, make_cache

REPO = Path(__file__).resolve().parents[3]


def results_for(target, tasks):
    return {
        "model_path": f"{target}/final",
        "model_sha256": "ab" * 32,
        "dtype": "float32",
        "tasks": {t: {"metrics": {"acc": 0.5}, "stderr": {"acc": 0.01}} for t in tasks},
    }


@pytest.fixture
def calls(monkeypatch):
    """Each evaluate() call's (target, tasks, keyword arguments); returns fabricated results."""
    seen = []

    def fake_evaluate(target, tasks, **kw):
        seen.append((target, tasks, kw))
        return results_for(target, tasks)

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    return seen


def parser():
    p = argparse.ArgumentParser(prog="kdcache")
    study_cli.register(p.add_subparsers(dest="command"))
    return p


# ---- the parsers -------------------------------------------------------------------------------------------


def test_register_adds_eval_report_and_plot_with_their_defaults():
    p = parser()
    e = p.parse_args(["eval", "runs/a"])
    assert (e.targets, e.tasks, e.limit, e.batch_size, e.dtype, e.engine) == (
        ["runs/a"],
        study_cli.DEFAULT_TASKS,
        None,
        "auto",
        "auto",
        "auto",
    )
    assert (e.device, e.chat_template, e.include_path, e.force, e.out) == (None, "auto", None, False, None)
    r = p.parse_args(["report", "a", "b"])
    assert (r.runs, r.out) == (["a", "b"], "runs/report")
    pl = p.parse_args(["plot", "a"])
    assert (pl.runs, pl.out) == (["a"], None)
    assert (e.func, r.func, pl.func) == (study_cli._eval, study_cli._report, study_cli._plot)


@pytest.mark.parametrize(
    "argv", [["eval"], ["eval", "x", "--dtype", "float16"], ["eval", "x", "--engine", "tgi"], ["report"], ["plot"]]
)
def test_bad_arguments_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(argv)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


def test_the_offline_tasks_named_in_the_help_are_defined_in_the_bundled_tasks():
    import re

    yamls = (REPO / "kdcache" / "study" / "tasks").glob(
        "*.yaml"
    )  # lm-eval YAML (its !function tags): read the task line
    defined = {re.search(r"^task: *(\S+)", p.read_text(), re.M).group(1) for p in yamls}
    assert set(study_cli.LOCAL_TASKS.split(",")) == defined


# ---- eval ----------------------------------------------------------------------------------------------------


def test_eval_passes_each_target_and_prints_its_table(calls, capsys):
    assert main(["eval", "runs/a", "runs/b", "--tasks", " ifeval, gsm8k_cot ,,"]) == 0
    assert [(t, tasks) for t, tasks, _ in calls] == [
        ("runs/a", ["ifeval", "gsm8k_cot"]),
        ("runs/b", ["ifeval", "gsm8k_cot"]),
    ]
    kw = calls[0][2]
    assert kw == {
        "out": None,
        "batch_size": "auto",
        "dtype": "auto",
        "device": None,
        "limit": None,
        "engine": "auto",
        "force": False,
        "apply_chat_template": None,
        "include_path": None,
    }
    printed = capsys.readouterr().out
    assert printed.count("| ifeval | acc | 0.5000 | 0.0100 |") == 2
    assert printed.index("runs/a/final") < printed.index("runs/b/final")


@pytest.mark.parametrize("limit, passed", [("20", 20), ("0.25", 0.25), ("1", 1), ("3.0", 3)])
def test_eval_limit_is_a_count_from_one_up_and_a_fraction_below(calls, limit, passed):
    main(["eval", "m", "--limit", limit])
    got = calls[0][2]["limit"]
    assert got == passed and type(got) is type(passed)


@pytest.mark.parametrize("flag, passed", [("8", 8), ("auto", "auto"), ("auto:4", "auto:4")])
def test_eval_batch_size_is_an_integer_or_passed_as_given(calls, flag, passed):
    main(["eval", "m", "--batch-size", flag])
    assert calls[0][2]["batch_size"] == passed


@pytest.mark.parametrize("flag, passed", [("auto", None), ("on", True), ("off", False)])
def test_eval_chat_template_flag(calls, flag, passed):
    main(["eval", "m", "--chat-template", flag])
    assert calls[0][2]["apply_chat_template"] is passed


def test_eval_passes_the_remaining_flags_through(calls, tmp_path):
    main(
        [
            "eval",
            "m",
            "--out",
            str(tmp_path),
            "--dtype",
            "bfloat16",
            "--engine",
            "hf",
            "--device",
            "cuda:1",
            "--force",
            "--include-path",
            "extra/tasks",
        ]
    )
    kw = calls[0][2]
    assert (kw["out"], kw["dtype"], kw["engine"], kw["device"], kw["force"], kw["include_path"]) == (
        str(tmp_path),
        "bfloat16",
        "hf",
        "cuda:1",
        True,
        "extra/tasks",
    )


def test_eval_out_with_several_targets_is_one_line_before_anything_runs(calls, capsys, tmp_path):
    assert main(["eval", "a", "b", "--out", str(tmp_path)]) == 1
    assert calls == []
    assert capsys.readouterr().err == (
        "kdcache eval: error: --out takes one MODEL_OR_RUN; several run folders each keep their own "
        "RUN/eval/results.json\n"
    )


# ---- report and plot -----------------------------------------------------------------------------------------


def test_report_writes_the_report_and_prints_it(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache")
    runs = [
        str(fake_run(tmp_path / "runs", f"{loss}{seed}", cache, loss=loss, seed=seed))
        for loss in ("KD", "SFT")
        for seed in (0, 1)
    ]
    assert main(["report", *runs, "--out", str(tmp_path / "report")]) == 0
    out = tmp_path / "report"
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "study.png", "loss_curves.png"}
    assert capsys.readouterr().out == (out / "report.md").read_text() + "\n"
    assert {g["loss"] for g in json.loads((out / "report.json").read_text())["groups"]} == {"KD", "SFT"}


def test_report_of_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    (tmp_path / "not-a-run").mkdir()
    assert main(["report", str(tmp_path / "not-a-run"), "--out", str(tmp_path / "report")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kdcache report: error: ") and err.count("\n") == 1 and "not-a-run" in err


def test_plot_prints_the_png_it_wrote(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache")
    run = fake_run(tmp_path / "runs", "kd", cache)
    assert main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'plots' / 'loss_curves.png'}\n"
    assert (tmp_path / "plots" / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(run)]) == 0  # default: into the run folder
    assert capsys.readouterr().out == f"{run / 'loss_curves.png'}\n"


def test_plot_of_a_folder_without_metrics_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"kdcache plot: error: {tmp_path}: no metrics.jsonl (is this a `kdcache train` run folder?)\n"
    )
