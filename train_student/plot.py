"""`kdcache plot RUN_DIR...`: loss curves from runs' metrics.jsonl as PNG (matplotlib, Agg)."""
from __future__ import annotations

import json
from pathlib import Path

from formats.errors import InputError

PANELS = [("train", "loss", "train loss"), ("eval", "kl", "held-out KL(teacher || student)"),
          ("eval", "ce", "held-out CE (nats/token)"), ("eval", "top1_agreement", "held-out top-1 agreement")]


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise InputError(f"{run_dir}: no metrics.jsonl (is this a `kdcache train` run folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(runs: list[str], out: str | None = None) -> list[Path]:
    """One PNG with a panel per curve, every run overlaid. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
