"""`kdcache plot RUN_DIR...`: loss curves from runs' metrics.jsonl as PNG (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from formats.errors import FormatError, InputError
from formats.trust import loads

MAX_METRICS_LINE = 1 << 20
TRAIN_METRICS = {"ce": "held-out CE", "kl": "held-out KL(teacher‖student)", "top1_agreement": "top-1 agreement"}


def metric_name(m: str) -> str:
    return TRAIN_METRICS.get(m, m)


def series_label(series: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in series.items()) or "all runs"


PANELS = [
    ("train", "loss", "train loss"),
    ("eval", "kl", "held-out KL(teacher || student)"),
    ("eval", "ce", "held-out CE (nats/token)"),
    ("eval", "top1_agreement", "held-out top-1 agreement"),
]


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise InputError(f"{run_dir}: no metrics.jsonl (is this a `kdcache train` run folder?)")
    rows = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = loads(line, str(path), max_bytes=MAX_METRICS_LINE, what=f"line {i}")
        except FormatError as exc:
            raise InputError(f"{exc}; the file is damaged: rerun the training (or drop the run)") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise InputError(f"{path}: line {i} is not a metrics row (a JSON object with an integer `step`)")
        rows.append(row)
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def study_figure(study: dict):
    """The paper's figure from a `kdcache.study.report.study` summary: one panel per metric, metric vs
    training-data fraction (log x), one line per loss (KD, SFT) and series (teacher, stages, ...), error
    bars = std over seeds. Returns the matplotlib Figure (one errorbar container per line)."""

    plt = _pyplot()
    metrics = study["metrics"]
    cols = min(len(metrics), 3) or 1
    rows = -(-len(metrics) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows + 0.6), squeeze=False, layout="constrained")
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    # a colour per line (loss and series: teacher, stages, ...), a line style per loss: KD solid, SFT dashed
    keys = dict.fromkeys((g["loss"], series_label(g["series"]) if g["series"] else "") for g in study["groups"])
    colours = {key: f"C{i % 10}" for i, key in enumerate(keys)}
    styles = {"KD": "-", "SFT": "--"}
    legend: dict[str, object] = {}
    for ax, m in zip(axes.flat, metrics):
        lines: dict[tuple, list[tuple]] = {}
        for g in study["groups"]:
            if m in g["metrics"]:
                st = g["metrics"][m]
                key = (g["loss"], series_label(g["series"]) if g["series"] else "")
                lines.setdefault(key, []).append((g["data_fraction"], st["mean"], st["std"] or 0.0))
        for (loss, series), pts in lines.items():
            xs, ys, es = zip(*sorted(pts))
            label = f"{loss} ({series})" if series else loss
            bar = ax.errorbar(
                xs,
                ys,
                yerr=es,
                marker="o",
                capsize=3,
                label=label,
                linestyle=styles.get(loss, ":"),
                color=colours[loss, series],
            )
            legend.setdefault(label, bar)
        ax.set_xscale("log")
        fractions = sorted({x for pts in lines.values() for x, _, _ in pts})
        ax.set_xticks(fractions, [f"{x:g}" for x in fractions])  # the ladder's own fractions, not 10^k
        ax.minorticks_off()
        ax.set_title(metric_name(m), fontsize=10)
        ax.set_xlabel("training-data fraction (log)")
        ax.grid(alpha=0.3)
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="outside lower center",
        fontsize=7,
        ncol=2 if len(legend) > 2 and max(map(len, legend)) < 60 else 1,
    )
    return fig


def plot_study(study: dict, path: str | Path) -> Path:
    """study_figure saved as PNG at `path`."""
    fig = study_figure(study)
    path = Path(path)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_runs(runs: list[str], out: str | None = None) -> list[Path]:
    """One PNG with a panel per curve, every run overlaid. Returns the files written."""
    plt = _pyplot()
    data = {str(r): read_metrics(r) for r in runs}
    names = [Path(r).name for r in data]
    label = {r: (Path(r).name if names.count(Path(r).name) == 1 else "/".join(Path(r).parts[-2:])) for r in data}
    out_dir = Path(out or runs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (split, key, title) in zip(axes.flat, PANELS):
        for name, rows in data.items():
            pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="." if split == "eval" else None, label=label[name])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
