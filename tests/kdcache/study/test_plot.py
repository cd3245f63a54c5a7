"""kdcache.study.plot: the metric names and series labels, `read_metrics` (rows, and one-line errors for a
folder without metrics.jsonl or a damaged one), `study_figure` (panels, one line per loss and series,
styles, colours, error bars, ticks), `plot_study` and `plot_runs` (the PNGs, the run labels, the panels).
tests/kdcache/study/test_report.py draws the figure of a real study summary; here hand-made ones."""

from __future__ import annotations

import json

import matplotlib
import pytest

from formats.errors import InputError
from kdcache.study import plot
from kdcache.study.plot import metric_name, plot_runs, plot_study, read_metrics, series_label, study_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder, rows, raw: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows))
    return folder


def group(loss, frac, metrics, **series):
    return {"loss": loss, "series": series, "data_fraction": frac, "metrics": metrics}


# ---- names ---------------------------------------------------------------------------------------------


def test_metric_names_of_the_training_metrics_and_others_as_given():
    assert metric_name("ce") == "held-out CE"
    assert metric_name("kl") == "held-out KL(teacher‖student)"
    assert metric_name("top1_agreement") == "top-1 agreement"
    assert metric_name("ifeval prompt_level_strict_acc") == "ifeval prompt_level_strict_acc"


def test_series_label_lists_the_factors_or_says_all_runs():
    assert (
        series_label({"teacher": "smollm2 bfloat16 k=64", "stages": "2"}) == "teacher=smollm2 bfloat16 k=64, stages=2"
    )
    assert series_label({}) == "all runs"


# ---- read_metrics ----------------------------------------------------------------------------------------


def test_read_metrics_returns_the_rows_skipping_blank_lines(tmp_path):
    rows = [{"step": 1, "split": "train", "loss": 2.5}, {"step": 1, "split": "eval", "kl": 0.3}]
    run = write_run(tmp_path / "run", rows, raw=json.dumps(rows[0]) + "\n\n  \n" + json.dumps(rows[1]) + "\n")
    assert read_metrics(run) == rows
    assert read_metrics(str(run)) == rows


def test_a_folder_without_metrics_is_not_a_run(tmp_path):
    with pytest.raises(InputError) as err:
        read_metrics(tmp_path)
    assert str(err.value) == f"{tmp_path}: no metrics.jsonl (is this a `kdcache train` run folder?)"


def test_a_line_that_is_not_json_names_the_file_and_line_and_says_rerun(tmp_path):
    run = write_run(tmp_path / "run", [], raw='{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    with pytest.raises(InputError) as err:
        read_metrics(run)
    message = str(err.value)
    assert message.startswith(f"{run / 'metrics.jsonl'}: line 2 is not valid JSON")
    assert message.endswith("; the file is damaged: rerun the training (or drop the run)") and "\n" not in message


@pytest.mark.parametrize("line", ["[1, 2]", '{"loss": 2.0}', '{"step": "3"}', '{"step": 1.5}', '"text"'])
def test_a_line_that_is_not_a_metrics_row_is_refused(tmp_path, line):
    run = write_run(tmp_path / "run", [], raw='{"step": 1}\n' + line + "\n")
    with pytest.raises(InputError) as err:
        read_metrics(run)
    assert str(err.value) == (
        f"{run / 'metrics.jsonl'}: line 2 is not a metrics row (a JSON object with an integer `step`)"
    )


def test_a_line_over_the_size_limit_is_refused_without_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr(plot, "MAX_METRICS_LINE", 64)
    run = write_run(tmp_path / "run", [{"step": 1, "note": "x" * 100}])
    with pytest.raises(InputError, match=r"line 1 of \d+ bytes, more than the 64 it may hold"):
        read_metrics(run)


# ---- study_figure, plot_study ---------------------------------------------------------------------------------


STUDY = {
    "metrics": ["ce", "kl", "top1_agreement", "ifeval acc"],
    "groups": [
        group("KD", 0.25, {"ce": {"mean": 2.0, "std": 0.1}, "kl": {"mean": 0.5, "std": None}}, teacher="A"),
        group("KD", 1.0, {"ce": {"mean": 1.5, "std": 0.2}, "kl": {"mean": 0.3, "std": 0.05}}, teacher="A"),
        group("SFT", 1.0, {"ce": {"mean": 1.8, "std": 0.0}}, teacher="A"),
        group("SFT", 0.25, {"ce": {"mean": 2.4, "std": 0.3}}, teacher="A"),
        group("KD", 1.0, {"ce": {"mean": 1.4, "std": 0.1}, "ifeval acc": {"mean": 0.4, "std": 0.02}}, teacher="B"),
        group("MiniLLM", 1.0, {"ce": {"mean": 1.6, "std": 0.1}}, teacher="B"),
    ],
}


@pytest.fixture
def figure():
    fig = study_figure(STUDY)
    yield fig
    plt.close(fig)


def lines_of(ax) -> dict[str, object]:
    """label -> errorbar container of one panel."""
    return {c.get_label(): c for c in ax.containers}


def test_one_panel_per_metric_in_rows_of_three(figure):
    axes = figure.axes
    assert len(axes) == 6 and [ax.get_visible() for ax in axes] == [True] * 4 + [False] * 2
    assert [ax.get_title() for ax in axes[:4]] == [
        "held-out CE",
        "held-out KL(teacher‖student)",
        "top-1 agreement",
        "ifeval acc",
    ]
    assert all(ax.get_xscale() == "log" for ax in axes[:4])


def test_a_line_per_loss_and_series_with_its_points_in_fraction_order(figure):
    ce = lines_of(figure.axes[0])
    assert sorted(ce) == ["KD (teacher=A)", "KD (teacher=B)", "MiniLLM (teacher=B)", "SFT (teacher=A)"]
    data = ce["SFT (teacher=A)"].lines[0]
    assert list(data.get_xdata()) == [0.25, 1.0] and list(data.get_ydata()) == [2.4, 1.8]  # sorted by fraction
    assert sorted(lines_of(figure.axes[1])) == ["KD (teacher=A)"]  # only groups that have the metric
    assert lines_of(figure.axes[2]) == {}  # no group has it: an empty panel


def test_error_bars_are_the_std_and_a_missing_std_is_zero(figure):
    kl = lines_of(figure.axes[1])["KD (teacher=A)"]
    (bars,) = kl.lines[2]  # the vertical error segments
    half_heights = [abs(seg[1][1] - seg[0][1]) / 2 for seg in bars.get_segments()]
    assert half_heights == pytest.approx([0.0, 0.05])


def test_kd_is_solid_sft_dashed_others_dotted_and_each_line_keeps_its_colour(figure):
    ce, ifeval = lines_of(figure.axes[0]), lines_of(figure.axes[3])
    style = {label: c.lines[0].get_linestyle() for label, c in ce.items()}
    assert style == {"KD (teacher=A)": "-", "SFT (teacher=A)": "--", "KD (teacher=B)": "-", "MiniLLM (teacher=B)": ":"}
    colours = {c.lines[0].get_color() for c in ce.values()}
    assert len(colours) == 4  # a colour per line
    assert ifeval["KD (teacher=B)"].lines[0].get_color() == ce["KD (teacher=B)"].lines[0].get_color()


def test_x_ticks_are_the_fractions_themselves(figure):
    ax = figure.axes[0]
    assert list(ax.get_xticks()) == [0.25, 1.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.25", "1"]


def test_the_legend_has_each_line_once(figure):
    (legend,) = figure.legends
    assert sorted(t.get_text() for t in legend.get_texts()) == [
        "KD (teacher=A)",
        "KD (teacher=B)",
        "MiniLLM (teacher=B)",
        "SFT (teacher=A)",
    ]


def test_groups_without_a_series_are_labelled_by_the_loss_alone():
    fig = study_figure({"metrics": ["ce"], "groups": [group("KD", 1.0, {"ce": {"mean": 1.0, "std": 0.0}})]})
    try:
        assert len(fig.axes) == 1 and list(lines_of(fig.axes[0])) == ["KD"]
    finally:
        plt.close(fig)


def test_plot_study_writes_a_png_and_closes_its_figure(tmp_path):
    before = plt.get_fignums()
    path = plot_study(STUDY, tmp_path / "study.png")
    assert path == tmp_path / "study.png" and path.read_bytes()[:8] == PNG
    assert plt.get_fignums() == before


# ---- plot_runs --------------------------------------------------------------------------------------------


def rows(offset: float) -> list[dict]:
    train = [{"step": s, "split": "train", "loss": 3.0 - s / 10 + offset} for s in range(1, 6)]
    evals = [{"step": s, "split": "eval", "kl": 1.0 / (s + 1) + offset, "ce": 2.0 + offset} for s in (0, 5)]
    return train + evals


@pytest.fixture
def captured(monkeypatch):
    """The figures plot_runs makes, kept open for the test (pyplot's close is deferred to the end)."""
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    yield figures
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)


def test_plot_runs_overlays_every_run_on_four_panels(tmp_path, captured):
    a = write_run(tmp_path / "kd", rows(0.0))
    b = write_run(tmp_path / "sft", rows(0.5))
    (png,) = plot_runs([str(a), str(b)], out=str(tmp_path / "plots"))
    assert png == tmp_path / "plots" / "loss_curves.png" and png.read_bytes()[:8] == PNG
    (fig,) = captured
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [title for _, _, title in plot.PANELS]
    loss, kl, ce, top1 = fig.axes
    assert [list(line.get_ydata()) for line in ce.lines] == [[2.0, 2.0], [2.5, 2.5]]
    assert [line.get_label() for line in loss.lines] == ["kd", "sft"]
    assert list(loss.lines[1].get_xdata()) == [1, 2, 3, 4, 5] and loss.lines[1].get_ydata()[0] == pytest.approx(3.4)
    assert list(kl.lines[0].get_xdata()) == [0, 5] and kl.lines[0].get_marker() == "."  # eval points marked
    assert loss.lines[0].get_marker() in (None, "None", "")
    assert len(top1.lines) == 0 and top1.get_legend() is None  # no run logged it: empty, no legend


def test_runs_with_the_same_folder_name_are_labelled_by_their_parent(tmp_path, captured):
    a = write_run(tmp_path / "seed0" / "run", rows(0.0))
    b = write_run(tmp_path / "seed1" / "run", rows(0.1))
    (png,) = plot_runs([str(a), str(b)])
    assert png == a / "loss_curves.png"  # the first run's folder by default
    assert [line.get_label() for line in captured[0].axes[0].lines] == ["seed0/run", "seed1/run"]


def test_plot_runs_stops_at_a_run_without_metrics_before_writing(tmp_path, captured):
    good = write_run(tmp_path / "good", rows(0.0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no metrics.jsonl"):
        plot_runs([str(good), str(tmp_path / "empty")], out=str(tmp_path / "plots"))
    assert not (tmp_path / "plots").exists() and captured == []
