"""`kdcache bench codec | cache | train`: the benchmarks, each a script in bench/ that prints a table."""
from __future__ import annotations

import importlib

# subcommand -> (module in bench/ with main(argv), one-line help)
BENCHES = {
    "codec": ("bench.codec_bench", "bytes/position, fidelity and decode speed of the cache codec settings"),
    "cache": ("bench.cache_bench", "teacher caching throughput: both engines in both dtypes; plain prefill, top-k call, whole pipeline"),
    "train": ("bench.train_bench", "trainer throughput and memory: naive vs chunked loss, reader speed, data wait"),
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark and print its table",
                       description="Each benchmark prints a markdown table; `kdcache bench NAME --help` lists its "
                       "options. Record results in docs/BENCHMARKS.md.")
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
