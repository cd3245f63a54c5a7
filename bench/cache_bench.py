"""`kdcache bench cache`: teacher caching throughput, in one run and one vLLM engine:
(a) the bare vLLM call with the same prompt logprobs, (b) the whole pipeline, (c) the hf engine.

    make bench-data            # prepares runs/teacher (SmolLM2-135M-Instruct) once
    kdcache bench cache --teacher runs/teacher --data ../shared/data/tulu3_sft_sample.jsonl

The measurement itself lives in cache_teacher/bench.py (it drives the engine directly).
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
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2, help="rounds of (a) and (b); the fastest of each counts")
    p.add_argument("--hf-rows", type=int, default=16, help="records the (slow) hf engine scores")
    p.add_argument("--json", help="also write the raw measurements here")
    args = p.parse_args(argv)

    from cache_teacher.bench import bench_cache, format_table
    from cache_teacher.config import make_config

    config = make_config(teacher=args.teacher, dataset=args.data, out="runs/bench-cache-scratch", k=args.k,
                         max_length=args.max_length, max_examples=args.max_examples, enforce_eager=True,
                         gpu_memory_utilization=0.3, kv_cache_space_gb=2)
    result = bench_cache(config, repeats=args.repeats, hf_rows=args.hf_rows)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
