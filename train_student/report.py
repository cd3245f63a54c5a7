"""`kdcache report RUN_DIR...`: finished training runs -> one comparison table (markdown) and plot (PNG)."""
from __future__ import annotations

import json
from pathlib import Path

from formats.errors import InputError
from train_student.plot import plot_runs, read_metrics


def run_row(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    evals = [r for r in rows if r.get("split") == "eval"]
    trains = [r for r in rows if r.get("split") == "train"]
    if not evals:
        raise InputError(f"{run_dir}: no evaluation in metrics.jsonl (run with eval_fraction > 0)")
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    stages = cfg.get("stages") or [{k: cfg.get(k) for k in ("cache", "kd_weight", "ce_weight", "max_examples", "temperature")}]
    secs = sum(r["tokens"] / max(r.get("tokens_per_s", 0), 1e-9) for r in trains)
    last = evals[-1]
    return {"run": run_dir.name, "step": last["step"], "kl": last["kl"], "ce": last["ce"], "ppl": last["ppl"],
            "top1": last["top1_agreement"], "tokens": sum(r["tokens"] for r in trains),
            "tokens_per_s": sum(r["tokens"] for r in trains) / secs if secs else 0.0,
            "recipe": "; ".join(f"kd={s.get('kd_weight')} ce={s.get('ce_weight')} max_examples={s.get('max_examples')} "
                                f"cache={','.join(Path(c).name for c in s.get('cache') or [])}" for s in stages)}


def comparison_markdown(rows: list[dict]) -> str:
    lines = ["| run | step | held-out KL | held-out CE | ppl | top-1 agreement | train tokens | tokens/s | recipe |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['step']} | {r['kl']:.4f} | {r['ce']:.4f} | {r['ppl']:.2f} | {r['top1']:.3f} | "
                     f"{r['tokens']:,} | {r['tokens_per_s']:,.0f} | {r['recipe']} |")
    return "\n".join(lines)


def write_report(runs: list[str], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_row(r) for r in runs]
    png = plot_runs(runs, str(out))[0]
    path = out / "report.md"
    path.write_text(f"# Run comparison\n\n{comparison_markdown(rows)}\n\n![curves]({png.name})\n")
    return path
