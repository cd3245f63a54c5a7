"""The `kdcache` command: one entry point, subcommands registered by each package.

Each package owns a `cli.py` with `register(subparsers)`; handlers import their heavy
dependencies (vLLM, transformers, torch) lazily so `kdcache --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from formats.common.cli import run_command

# Order is the order of `kdcache --help`: the data flow, then tools.
_PACKAGES = (
    "cache_teacher.cli",
    "formats.cli",
    "train_student.cli",
    "kdcache.study.cli",
    "kdcache.demo_cli",
    "kdcache.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdcache",
        description="Cache a teacher's top-k logprobs once (vLLM -> Parquet shards), "
        "then train students from the cache with a sparse-KL loss.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _PACKAGES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a package still being written must not break the rest
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Benchmarks parse their own options: everything after `kdcache bench NAME` goes to them.
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "bench":
        args.args = list(getattr(args, "args", [])) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(parser, args, "kdcache")


if __name__ == "__main__":
    sys.exit(main())
