"""`kdcache bench cache`: teacher caching throughput of both engines (hf, vllm) in both dtypes (float32,
bfloat16) on this machine, each in one started engine; the processor and its flags head the table.

    kdcache prepare-teacher smollm2-135m-instruct --out runs/teacher      # once
    kdcache bench cache --teacher runs/teacher --data ../shared/data/tulu3_sft_sample.jsonl --max-examples 16

    from cache_teacher.bench import bench_cache, format_table           # from Python
    print(format_table(bench_cache(config)))

For each (engine, dtype), on the same templated records, in one process and one started engine:
  plain     the engine's plain prefill without logprobs (vLLM: `generate` with max_tokens=1, prefix
            caching off so repeats recompute; hf: the decoder body over the same batches, no LM head),
  bare      the bare engine call with top-k (vLLM: `generate` with prompt_logprobs=k, no extraction;
            hf: `HFEngine.score`),
  pipeline  the whole pipeline (`run_cache`: templating, engine, extraction, encoding, writing) into a
            scratch cache.
The three alternate for `repeats` rounds and the fastest of each counts (other jobs share the machine).
Ratios: pipeline / bare time (target <= 1.10) and capture / plain tokens/s (target >= 0.90).
Needs an `if __name__ == "__main__":` guard in the calling script (vLLM starts processes with spawn).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def machine() -> dict:
    """Processor, relevant flags, cores and load: the header of every table."""
    from formats.common.hardware import REPORTED_CPU_FLAGS, cpu_flags, cpu_model, usable_cpu_flags

    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "flags": {f: f in flags for f in REPORTED_CPU_FLAGS},
        "cores": os.cpu_count(),
        "torch_capped_by": usable_cpu_flags()[1],
        "load_before": os.getloadavg()[0],
    }


def templated(config, tokenizer) -> list:
    from cache_teacher.data import iter_records
    from formats.template import ChatTemplater, TemplateReject

    templater = ChatTemplater(tokenizer, config.max_length, config.length_policy)
    items = []
    for record, reject in iter_records(config):
        if reject is None:
            try:
                items.append(templater.score(record))
            except TemplateReject:
                continue
    return items


def start_engine(config):
    """(engine, seconds to start). vLLM without prefix caching: plain prefills of repeated prompts would
    otherwise reuse the KV cache and look several times faster than they are."""
    from cache_teacher.engines.hf_engine import HFEngine
    from cache_teacher.engines.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    engine = VLLMEngine(config, enable_prefix_caching=False) if config.engine == "vllm" else HFEngine(config)
    return engine, time.perf_counter() - t0


def _plain_and_bare(engine, config, items):
    """(plain prefill, bare top-k call) as two callables for `engine`."""
    if config.engine == "hf":
        return (lambda: engine.prefill(items, config)), (lambda: engine.score(items, config))
    from vllm import SamplingParams

    prompts = engine._prompts(items)
    plain = SamplingParams(max_tokens=1, detokenize=False)
    topk = SamplingParams(max_tokens=1, prompt_logprobs=config.k, flat_logprobs=True, detokenize=False)
    return (
        lambda: engine.llm.generate(prompts, plain, use_tqdm=False),
        lambda: engine.llm.generate(prompts, topk, use_tqdm=False),
    )


def bench_one(config, items, tokenizer, repeats: int, root: Path, engine=None) -> dict:
    """Plain, bare and pipeline seconds (lists, one per round) of one (engine, dtype) on `items`."""
    from cache_teacher.run import run_cache

    own = engine is None
    start_s = None
    if own:
        engine, start_s = start_engine(config)
    run = {
        "engine": config.engine,
        "dtype": config.dtype,
        "start_s": start_s,
        "plain_s": [],
        "bare_s": [],
        "pipeline_s": [],
    }
    plain, bare = _plain_and_bare(engine, config, items)
    try:
        _plain_and_bare(engine, config, items[:2])[1]()  # warm-up: allocators, kernels, the engine's first step
        for r in range(repeats):
            for name, call in (("plain_s", plain), ("bare_s", bare)):
                t0 = time.perf_counter()
                call()
                run[name].append(time.perf_counter() - t0)
            out = root / f"{config.engine}-{config.dtype}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            summary = run_cache(dataclasses.replace(config, out=str(out)), engine=engine, tokenizer=tokenizer)
            run["pipeline_s"].append(time.perf_counter() - t0)
            run["bytes_per_position"] = summary.cache_bytes / max(1, summary.cache_positions)
    finally:
        if own:
            engine.close()
    return run


def bench_cache(
    config,
    engines=("hf", "vllm"),
    dtypes=("float32", "bfloat16"),
    repeats: int = 2,
    scratch: str | None = None,
    started: dict | None = None,
    reserved_cpus: tuple[int, ...] = (),
    compiled: bool = False,
) -> dict:
    """Measure every (engine, dtype) on the records of `config` (see the module docstring).

    started: {(engine, dtype): an already started engine} to use instead of starting one (tests).
    reserved_cpus: also run vLLM float32 with VLLM_CPU_NUM_OF_RESERVED_CPU set to each of these.
    compiled: also run vLLM float32 without --enforce-eager (compiled; its start-up includes compiling).
    Returns {"machine", "records", "tokens", "positions", "k", "runs": [per (engine, dtype)], "auto"}."""
    from cache_teacher.config import resolve_auto
    from cache_teacher.provenance import teacher_tokenizer

    base = dataclasses.replace(config, progress=False, dry_run=False, launcher="local")
    tokenizer = teacher_tokenizer(base)
    items = templated(base, tokenizer)
    auto = resolve_auto(dataclasses.replace(base, engine="auto", dtype="auto", engine_reason=None, dtype_reason=None))
    result = {
        "machine": machine(),
        "records": len(items),
        "tokens": sum(len(i.input_ids) for i in items),
        "positions": int(sum(len(i.target_positions) for i in items)),
        "k": base.k,
        "max_length": base.max_length,
        "auto": (auto.engine, auto.dtype),
        "runs": [],
    }
    root = Path(scratch or tempfile.mkdtemp(prefix="kdcache-bench-"))
    try:
        for engine in engines:
            for dtype in dtypes:
                cfg = resolve_auto(
                    dataclasses.replace(base, engine=engine, dtype=dtype, engine_reason=None, dtype_reason=None)
                )
                given = (started or {}).get((engine, dtype))
                result["runs"].append(bench_one(cfg, items, tokenizer, repeats, root, engine=given))
        vllm32 = resolve_auto(
            dataclasses.replace(base, engine="vllm", dtype="float32", engine_reason=None, dtype_reason=None)
        )
        for n in reserved_cpus:
            before = os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU")
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(n)
            try:
                run = bench_one(vllm32, items, tokenizer, repeats, root)
            finally:
                if before is None:
                    os.environ.pop("VLLM_CPU_NUM_OF_RESERVED_CPU")
                else:
                    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = before
            result["runs"].append({**run, "engine": f"vllm, VLLM_CPU_NUM_OF_RESERVED_CPU={n}"})
        if compiled:
            run = bench_one(dataclasses.replace(vllm32, enforce_eager=False), items, tokenizer, repeats, root)
            result["runs"].append({**run, "engine": "vllm, compiled (no --enforce-eager)"})
    finally:
        if scratch is None:
            shutil.rmtree(root, ignore_errors=True)
    result["machine"]["load_after"] = os.getloadavg()[0]
    return result


def format_table(r: dict) -> str:
    m = r["machine"]
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in m["flags"].items())
    tokens = r["tokens"]
    capped = f"; torch capped by {m['torch_capped_by']}" if m.get("torch_capped_by") else ""
    lines = [
        f"CPU: {m['cpu']} ({flags}{capped}); {m['cores']} cores; load average {m['load_before']:.1f} before, "
        f"{m.get('load_after', float('nan')):.1f} after",
        f"{r['records']} records (<= {r['max_length']} tokens), {tokens} tokens, {r['positions']} trained "
        f"positions, k={r['k']}; fastest of {len(r['runs'][0]['bare_s']) if r['runs'] else 0} rounds; "
        f"`--engine auto --dtype auto` here: {r['auto'][0]}, {r['auto'][1]}",
        "",
        "| engine | dtype | start s | plain prefill tok/s | top-k call tok/s | pipeline tok/s "
        "| pipeline / top-k call time (<= 1.10) | top-k / plain tok/s (>= 0.90) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        plain, bare, pipe = min(run["plain_s"]), min(run["bare_s"]), min(run["pipeline_s"])
        start = f"{run['start_s']:.1f}" if run["start_s"] is not None else "(shared)"
        auto = " (auto)" if (run["engine"], run["dtype"]) == tuple(r["auto"]) else ""
        lines.append(
            f"| {run['engine']}{auto} | {run['dtype']} | {start} | {tokens / plain:,.0f} | {tokens / bare:,.0f} "
            f"| {tokens / pipe:,.0f} | {pipe / bare:.3f} | {plain / bare:.3f} |"
        )
    if r["runs"] and "bytes_per_position" in r["runs"][0]:
        lines.append(f"\ncache: {r['runs'][0]['bytes_per_position']:.1f} bytes/position")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="kdcache bench cache", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teacher", default="runs/teacher", help="teacher checkpoint folder (default runs/teacher)")
    p.add_argument("--data", default="../shared/data/tulu3_sft_sample.jsonl", help="chat .jsonl to score")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--max-length", type=int, default=512, help="tokens per conversation (default 512)")
    p.add_argument(
        "--max-examples",
        type=int,
        default=16,
        help="records scored (default 16: 4 engine x dtype pairs x 3 passes x 2 rounds take ~10 min on "
        "2 CPU cores; raise it on a GPU)",
    )
    p.add_argument("--engines", default="hf,vllm", help="comma-separated (default hf,vllm)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of plain / top-k / pipeline; the fastest counts")
    p.add_argument(
        "--reserved-cpus",
        default="",
        metavar="N,...",
        help="also run vLLM float32 with VLLM_CPU_NUM_OF_RESERVED_CPU=N (kdcache's default is 0; vllm-cpu's own is 1)",
    )
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also run vLLM float32 compiled (without --enforce-eager, kdcache's CPU default)",
    )
    p.add_argument("--json", help="also write the raw measurements here")
    args = p.parse_args(argv)

    from cache_teacher.config import make_config

    config = make_config(
        teacher=args.teacher,
        dataset=args.data,
        out="runs/bench-cache-scratch",
        k=args.k,
        max_length=args.max_length,
        max_examples=args.max_examples,
    )
    result = bench_cache(
        config,
        engines=[e for e in args.engines.split(",") if e],
        dtypes=[d for d in args.dtypes.split(",") if d],
        repeats=args.repeats,
        reserved_cpus=tuple(int(n) for n in args.reserved_cpus.split(",") if n),
        compiled=args.compiled,
    )
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
