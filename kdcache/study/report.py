"""`kdcache report RUN_DIR... --out DIR`: finished training runs -> the study's answers.

Each run is described by what it trained on and how, read from its folder and its caches:
- teacher: the `teacher` entry (name, dtype) and k of each cache's manifest.json,
- stages: the caches' modes per stage (`score`, or `generate -> score` for two-stage KD),
- loss: KD (kd_weight > 0, ce_weight 0), SFT (kd_weight 0) or KD+CE, per stage,
- data: the training-data fraction of the last stage (`fraction` x the share of the cache that
  `max_examples` keeps),
- any other recorded setting that differs between the runs (lr, steps, student, ...).
The seed (and bookkeeping such as the output folder) is replication: runs equal in everything else
form one group, shown as mean ± sample std over its seeds, with n.

Metrics: the final held-out evaluation of `kdcache train` (metrics.jsonl: CE on the held-out
examples' own responses, KL(teacher || student), top-1 agreement) and every task metric of
`kdcache eval` (RUN/eval/results.json) where present.

Writes report.md, report.json (the same numbers, for scripts), study.png (metric vs training-data
fraction, log x, a line per loss and teacher, error bars = std over seeds) and loss_curves.png.
A run folder that cannot be read (no config.json, a broken metrics.jsonl, no evaluation, a cache
whose manifest cannot be read) stops the report with an InputError naming the file: a study with a
silently missing run would report wrong means.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from formats.errors import FormatError, KDCacheError, InputError
from formats.trust import load_json_file
from train_student.config import Stage
from kdcache.study.plot import TRAIN_METRICS, metric_name, plot_runs, plot_study, read_metrics, series_label

# Settings that do not change what a run learns (or are the replication itself).
NOT_FACTORS = {
    "seed",
    "out",
    "resume",
    "progress",
    "tensorboard",
    "log_every",
    "save_every",
    "keep_checkpoints",
    "device",
    "eval_every",
}
# Stage settings that the teacher / stages / loss / data factors already describe.
STAGE_DESCRIBED = {"cache", "kd_weight", "ce_weight", "fraction", "max_examples", "name"}
STAGE_FIELDS = tuple(f.name for f in dataclasses.fields(Stage))  # a stage's settings (train_student/config.py)


@dataclass
class Run:
    path: Path
    seed: int
    loss: str
    data_fraction: float
    factors: dict[str, str]  # every other descriptor: teacher, stages, settings
    metrics: dict[str, float] = field(default_factory=dict)


# ==== reading one run ==============================================================================
MAX_RUN_FILE_BYTES = 64 << 20  # a run's config.json or results.json


def read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise InputError(f"{path}: missing; {what}")
    try:
        value = load_json_file(path, max_bytes=MAX_RUN_FILE_BYTES)
    except FormatError as exc:  # not JSON, or beyond the strict parser's bounds (depth, numbers, duplicate keys)
        raise InputError(f"{exc}; rerun what wrote it or remove the run from the report") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def stages_of(cfg: dict) -> list[dict]:
    """The run's stages as dicts (a single-stage config keeps its stage fields at the top level)."""
    stages = cfg.get("stages") or [{k: cfg.get(k) for k in STAGE_FIELDS if k in cfg}]
    return [{**s, "fraction": s.get("fraction", 1.0) if s.get("fraction") is not None else 1.0} for s in stages]


@lru_cache(maxsize=None)
def cache_info(cache: str) -> dict:
    """Teacher label, mode and example count of one cache (from its manifest)."""
    from formats.manifest import load_manifest

    try:
        m = load_manifest(cache)
    except KDCacheError as exc:
        raise InputError(
            f"the report names each run's teacher from its cache's manifest.json, and this one cannot be read: {exc}"
        ) from None
    teacher = m.get("teacher") or {}
    name = Path(str(teacher.get("name_or_path") or "unknown teacher").rstrip("/")).name
    dtype = teacher.get("dtype")
    label = f"{name} {dtype} k={m.get('k')}" if dtype else f"{name} k={m.get('k')}"
    return {"teacher": label, "mode": m.get("mode", "score"), "examples": (m.get("counts") or {}).get("examples")}


def loss_label(stage: dict) -> str:
    kd, ce = float(stage.get("kd_weight") or 0.0), float(stage.get("ce_weight") or 0.0)
    if kd > 0 and ce == 0:
        return "KD"
    if kd == 0 and ce > 0:
        return "SFT"
    return f"KD×{kd:g}+CE×{ce:g}"


def data_fraction(stage: dict, infos: list[dict], where: Path) -> float:
    frac = float(stage["fraction"])
    if stage.get("max_examples"):
        counts = [i["examples"] for i in infos]
        if not all(isinstance(c, int) and c > 0 for c in counts):
            raise InputError(
                f"{where}: max_examples={stage['max_examples']} but a cache's manifest has no example "
                "count to turn it into a data fraction"
            )
        frac *= sum(min(stage["max_examples"], c) for c in counts) / sum(counts)
    return frac


def final_metrics(run_dir: Path) -> dict[str, float]:
    evals = [r for r in read_metrics(run_dir) if r.get("split") == "eval"]
    if not evals:
        raise InputError(f"{run_dir / 'metrics.jsonl'}: no evaluation row (train with eval_fraction > 0)")
    last = evals[-1]
    missing = [k for k in TRAIN_METRICS if not isinstance(last.get(k), (int, float))]
    if missing:
        raise InputError(f"{run_dir / 'metrics.jsonl'}: the last eval row (step {last.get('step')}) lacks {missing}")
    return {k: float(last[k]) for k in TRAIN_METRICS}


def eval_metrics(run_dir: Path) -> dict[str, float]:
    """`kdcache eval` results (RUN/eval/results.json) as {"TASK METRIC": value}; {} when not evaluated."""
    path = run_dir / "eval" / "results.json"
    if not path.exists():
        return {}
    tasks = read_json(path, "").get("tasks")
    if not isinstance(tasks, dict):
        raise InputError(f"{path}: no `tasks` object; rerun `kdcache eval {run_dir}`")
    out = {}
    for task, entry in tasks.items():
        metrics = entry.get("metrics") if isinstance(entry, dict) else None
        if not isinstance(metrics, dict):
            raise InputError(f"{path}: task {task!r} has no `metrics` object; rerun `kdcache eval {run_dir}`")
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f"{task} {name}"] = float(value)
    return out


def settings(cfg: dict, stages: list[dict]) -> dict[str, str]:
    """Recorded settings that may differ between runs, other than those the named factors describe."""
    out = {
        k: json.dumps(v)
        for k, v in sorted(cfg.items())
        if k not in NOT_FACTORS and k != "stages" and k not in STAGE_FIELDS
    }
    for i, s in enumerate(stages):
        prefix = f"stage{i} " if len(stages) > 1 else ""
        out.update({prefix + k: json.dumps(v) for k, v in sorted(s.items()) if k not in STAGE_DESCRIBED})
    return out


def describe_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    cfg = read_json(run_dir / "config.json", "every `kdcache train` run folder has one: is this a run folder?")
    stages = stages_of(cfg)
    infos = [[cache_info(str(c)) for c in s.get("cache") or []] for s in stages]
    if not all(infos):
        raise InputError(f"{run_dir / 'config.json'}: a stage names no cache")
    factors = {
        "teacher": " → ".join(" + ".join(dict.fromkeys(i["teacher"] for i in si)) for si in infos),
        "stages": " → ".join("+".join(dict.fromkeys(i["mode"] for i in si)) for si in infos),
        **settings(cfg, stages),
    }
    return Run(
        path=run_dir,
        seed=int(cfg.get("seed") or 0),
        loss=" → ".join(loss_label(s) for s in stages),
        data_fraction=data_fraction(stages[-1], infos[-1], run_dir / "config.json"),
        factors=factors,
        metrics={**final_metrics(run_dir), **eval_metrics(run_dir)},
    )


# ==== the study ===================================================================================
def mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def difference(kd: dict, sft: dict) -> dict:
    """KD − SFT of two group means, with the standard error of the difference (Welch), None when n < 2."""
    se = (
        math.sqrt(kd["std"] ** 2 / kd["n"] + sft["std"] ** 2 / sft["n"])
        if kd["std"] is not None and sft["std"] is not None
        else None
    )
    return {"kd_minus_sft": kd["mean"] - sft["mean"], "stderr": se, "n_kd": kd["n"], "n_sft": sft["n"]}


def study(runs: list[Run]) -> dict:
    """Groups (series = the varying factors other than loss and data; loss; data) and KD − SFT."""
    varying = [
        k for k in dict.fromkeys(k for r in runs for k in r.factors) if len({r.factors.get(k) for r in runs}) > 1
    ]
    metrics = list(dict.fromkeys(m for r in runs for m in r.metrics))
    buckets: dict[tuple, list[Run]] = {}
    for r in runs:
        key = (tuple(r.factors.get(k) for k in varying), r.loss, r.data_fraction)
        buckets.setdefault(key, []).append(r)
    groups = []
    for (series, loss, frac), members in sorted(buckets.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        stats = {
            m: mean_std([r.metrics[m] for r in members if m in r.metrics])
            for m in metrics
            if any(m in r.metrics for r in members)
        }
        groups.append(
            {
                "series": dict(zip(varying, series)),
                "loss": loss,
                "data_fraction": frac,
                "seeds": sorted(r.seed for r in members),
                "runs": [str(r.path) for r in members],
                "metrics": stats,
            }
        )
    return {
        "runs": len(runs),
        "factors": varying,
        "metrics": metrics,
        "groups": groups,
        "differences": differences(groups, metrics),
    }


def differences(groups: list[dict], metrics: list[str]) -> list[dict]:
    index = {(json.dumps(g["series"], sort_keys=True), g["loss"], g["data_fraction"]): g for g in groups}
    out = []
    for (series, loss, frac), kd in index.items():
        sft = index.get((series, "SFT", frac))
        if loss != "KD" or sft is None:
            continue
        for m in metrics:
            if m in kd["metrics"] and m in sft["metrics"]:
                out.append(
                    {
                        "series": kd["series"],
                        "data_fraction": frac,
                        "metric": m,
                        **difference(kd["metrics"][m], sft["metrics"][m]),
                    }
                )
    return out


# ==== markdown ====================================================================================
def fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def study_markdown(s: dict, figure: str | None) -> str:
    cols = s["factors"]
    head = [*cols, "loss", "data fraction", "seeds", *(metric_name(m) for m in s["metrics"])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in s["groups"]:
        cells = [str(g["series"][c]) for c in cols] + [
            g["loss"],
            f"{g['data_fraction']:g}",
            f"n={len(g['seeds'])} ({','.join(map(str, g['seeds']))})",
        ]
        for m in s["metrics"]:
            st = g["metrics"].get(m)
            cells.append("" if st is None else f"{fmt(st['mean'])} ± {fmt(st['std'])} (n={st['n']})")
        lines.append("| " + " | ".join(cells) + " |")
    text = [
        f"{s['runs']} runs; grouped by {', '.join(['loss', 'data fraction', *cols])}; the seed is replication: "
        "mean ± sample std over seeds (n). Held-out metrics are on the cache's held-out examples (their own "
        "responses: the human references in score mode).",
        "",
        *lines,
        "",
    ]
    if s["differences"]:
        text += [
            "## KD − SFT",
            "",
            "Per data fraction: difference of the group means, ± its standard error "
            "(sqrt(std_KD²/n_KD + std_SFT²/n_SFT); — when a side has one seed). Lower is better for CE and KL, "
            "higher for agreement and task scores.",
            "",
            "| series | data fraction | metric | KD − SFT | std error | n KD | n SFT |",
            "|---|---|---|---|---|---|---|",
        ]
        text += [
            f"| {series_label(d['series'])} | {d['data_fraction']:g} | {metric_name(d['metric'])} | "
            f"{d['kd_minus_sft']:+.4f} | {fmt(d['stderr'])} | {d['n_kd']} | {d['n_sft']} |"
            for d in s["differences"]
        ]
        text.append("")
    if figure:
        text += [f"![metric vs training-data fraction]({figure})", ""]
    return "\n".join(text)


def run_table(rows: list[dict]) -> str:
    lines = [
        "| run | step | held-out KL | held-out CE | ppl | top-1 agreement | train tokens | tokens/s | recipe |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['step']} | {r['kl']:.4f} | {r['ce']:.4f} | {r['ppl']:.2f} | {r['top1']:.3f} | "
            f"{r['tokens']:,} | {r['tokens_per_s']:,.0f} | {r['recipe']} |"
        )
    return "\n".join(lines)


def run_row(run_dir: Path, cfg: dict) -> dict:
    rows = read_metrics(run_dir)
    last = [r for r in rows if r.get("split") == "eval"][-1]
    trains = [r for r in rows if r.get("split") == "train"]
    secs = sum(r["tokens"] / max(r.get("tokens_per_s", 0), 1e-9) for r in trains)
    return {
        "run": "/".join(run_dir.parts[-2:]),
        "step": last["step"],
        "kl": last["kl"],
        "ce": last["ce"],
        "ppl": last.get("ppl", math.exp(min(last["ce"], 50))),
        "top1": last["top1_agreement"],
        "tokens": sum(r["tokens"] for r in trains),
        "tokens_per_s": sum(r["tokens"] for r in trains) / secs if secs else 0.0,
        "recipe": "; ".join(
            f"kd={s.get('kd_weight')} ce={s.get('ce_weight')} fraction={s.get('fraction')} "
            f"max_examples={s.get('max_examples')} cache={','.join(Path(str(c)).name for c in s.get('cache') or [])}"
            for s in stages_of(cfg)
        ),
    }


def write_report(runs: list[str], out: str | Path, title: str = "Study report") -> Path:
    """Write report.md, report.json, study.png and loss_curves.png into `out`; returns report.md."""
    out = Path(out)
    described = [describe_run(r) for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    s = study(described)
    (out / "report.json").write_text(json.dumps(s, indent=2) + "\n")
    png = plot_study(s, out / "study.png")
    curves = plot_runs([str(r) for r in runs], str(out))[0]
    rows = [run_row(r.path, read_json(r.path / "config.json", "")) for r in described]
    path = out / "report.md"
    path.write_text(
        f"# {title}\n\n{study_markdown(s, png.name)}\n## Runs\n\n{run_table(rows)}\n\n"
        f"![learning curves]({curves.name})\n"
    )
    return path
