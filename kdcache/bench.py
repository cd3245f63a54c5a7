"""`kdcache bench NAME`: the benchmarks, each a module beside what it measures, with `main(argv)` that
prints a table. Modules load only when their benchmark runs, so `kdcache --help` stays fast."""

from __future__ import annotations

import importlib

# subcommand -> (module with main(argv), one-line help)
BENCHES = {
    "codec": ("formats.bench_codec", "bytes/position, fidelity and decode speed of the cache codec settings"),
    "codec-data": (
        "cache_teacher.bench_codec_data",
        "make the codec benchmark's input: the real teacher's top-k over chat rows (vLLM)",
    ),
    "cache": (
        "cache_teacher.bench",
        "teacher caching throughput: both engines in both dtypes; plain prefill, top-k call, whole pipeline",
    ),
    "train": ("train_student.bench", "trainer throughput and memory: naive vs chunked loss, reader speed, data wait"),
    "kernel-gpu": (
        "train_student.kernels.bench_gpu",
        "kd_loss naive / chunked / fused on one GPU: correctness, time, memory, TFLOP/s (torch + triton)",
    ),
}


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark and print its table",
        description="Each benchmark prints a markdown table; `kdcache bench NAME --help` lists its "
        "options. Record results in docs/BENCHMARKS.md.",
    )
    bench_sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_text) in BENCHES.items():
        # add_help=False: --help goes through to the benchmark's own parser
        bp = bench_sub.add_parser(name, help=help_text, add_help=False)
        bp.set_defaults(func=_runner(module, name))


def _runner(module: str, name: str):
    def run(args) -> int:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                raise SystemExit(f"kdcache bench {name}: {module} is not available in this installation") from None
            raise
        return int(mod.main(args.args) or 0)

    return run
