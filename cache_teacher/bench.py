"""Teacher-stage benchmark, for `kdcache bench cache`: how close the pipeline runs to the bare engine.

    from cache_teacher.bench import bench_cache, format_table
    print(format_table(bench_cache(config)))      # config: a CacheConfig with engine="vllm"

Measures on the same templated records, in one process and one vLLM engine:
  (a) the bare `vllm.LLM.generate` call with the same prompt logprobs (no extraction, no writing),
  (b) the whole pipeline (`run_cache`: templating, engine, extraction, encoding, writing) into a
      scratch cache,
  (c) the hf engine's pipeline on the first `hf_rows` records (it is several times slower).
(a) and (b) alternate for `repeats` rounds and the fastest of each counts (other jobs share the
machine). Requests with prompt logprobs are recomputed by vLLM (no prefix-cache reuse), so repeats
do not flatter later rounds. Needs an `if __name__ == "__main__":` guard in the calling script.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path


def bench_cache(config, repeats: int = 2, hf_rows: int = 16, scratch: str | None = None, engine=None) -> dict:
    """Returns {"tokens", "positions", "engine_start_s", "bare_s", "pipeline_s", "hf_tokens", "hf_s", ...}.

    `engine`: an already started VLLMEngine to use (else one is started, timed, and closed)."""
    from vllm import SamplingParams

    from cache_teacher.data import iter_records
    from cache_teacher.engines.vllm_engine import VLLMEngine
    from cache_teacher.run import run_cache, teacher_tokenizer
    from cache_teacher.template import ChatTemplater, TemplateReject

    config = dataclasses.replace(config, engine="vllm", progress=False, dry_run=False, launcher="local")
    tokenizer = teacher_tokenizer(config)
    templater = ChatTemplater(tokenizer, config.max_length, config.length_policy)
    items = []
    for record, _ in iter_records(config):
        if record is None:
            continue
        try:
            items.append(templater.score(record))
        except TemplateReject:
            continue
    tokens = sum(len(item.input_ids) for item in items)
    root = Path(scratch or tempfile.mkdtemp(prefix="kdcache-bench-"))
    own = engine is None
    t0 = time.perf_counter()
    engine = engine or VLLMEngine(config)
    result = {"records": len(items), "tokens": tokens, "positions": int(sum(len(i.target_positions) for i in items)),
              "k": config.k, "engine_start_s": time.perf_counter() - t0, "bare_s": [], "pipeline_s": []}
    params = SamplingParams(max_tokens=1, prompt_logprobs=config.k, flat_logprobs=True, detokenize=False)
    try:
        for r in range(repeats):
            t0 = time.perf_counter()
            engine.llm.generate(engine._prompts(items), params, use_tqdm=False)
            result["bare_s"].append(time.perf_counter() - t0)
            out = root / f"vllm-{r}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            summary = run_cache(dataclasses.replace(config, out=str(out)), engine=engine, tokenizer=tokenizer)
            result["pipeline_s"].append(time.perf_counter() - t0)
            result["bytes_per_position"] = summary.cache_bytes / max(1, summary.cache_positions)
    finally:
        if own:
            engine.close()
    if hf_rows:
        hf = dataclasses.replace(config, engine="hf", max_examples=hf_rows, out=str(root / "hf"))
        shutil.rmtree(root / "hf", ignore_errors=True)
        t0 = time.perf_counter()
        summary = run_cache(hf, tokenizer=tokenizer)
        result["hf_s"], result["hf_tokens"] = time.perf_counter() - t0, summary.tokens
        result["hf_teacher_s"] = summary.teacher_s
    if scratch is None:
        shutil.rmtree(root, ignore_errors=True)
    return result


def format_table(r: dict) -> str:
    bare, pipe = min(r["bare_s"]), min(r["pipeline_s"])
    rows = [("(a) bare vLLM call, prompt_logprobs=%d" % r["k"], r["tokens"], bare),
            ("(b) whole pipeline (vLLM engine)", r["tokens"], pipe)]
    if "hf_s" in r:
        rows.append(("(c) whole pipeline (hf engine)", r["hf_tokens"], r["hf_s"]))
    lines = [f"{r['records']} records, {r['tokens']} tokens, {r['positions']} trained positions; "
             f"vLLM engine start {r['engine_start_s']:.1f}s (not counted)",
             "| run | tokens | seconds | tokens/s |", "|---|---|---|---|"]
    lines += [f"| {name} | {n} | {s:.1f} | {n / s:.0f} |" for name, n, s in rows]
    lines.append(f"(b)/(a) time ratio: {pipe / bare:.3f} (target <= 1.10)")
    if "hf_s" in r:
        lines.append(f"vLLM pipeline is {(r['tokens'] / pipe) / (r['hf_tokens'] / r['hf_s']):.1f}x the hf engine's tokens/s")
    if "bytes_per_position" in r:
        lines.append(f"cache: {r['bytes_per_position']:.1f} bytes/position")
    return "\n".join(lines)
