"""Make the codec benchmark's input: a real teacher's top-k over real Tulu 3 rows.

    kdcache bench codec-data --teacher DIR --data ../shared/data/tulu3_sft_sample.jsonl \
        --out bench/data/smollm2_tulu_top128.npz

Runs vLLM (prompt_logprobs=k) over every row rendered with the teacher's chat template, truncated
to --max-length tokens, and keeps every predicted position. Writes `ids` [N, k] int32 and
`logprobs` [N, k] float32 in rank order (the input format of `kdcache bench codec`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="kdcache bench codec-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teacher", required=True, help="HF checkpoint folder (kdcache prepare-teacher)")
    p.add_argument("--data", required=True, help="Tulu-style .jsonl with `messages`")
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-rows", type=int, default=None)
    args = p.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from cache_teacher.engines.vllm_logprobs import dense_prompt_topk

    tok = AutoTokenizer.from_pretrained(args.teacher)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    rows = rows[: args.max_rows]
    prompts = []
    for row in rows:
        ids = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        prompts.append(TokensPrompt(prompt_token_ids=list(ids)[: args.max_length]))
    llm = LLM(
        args.teacher,
        dtype="bfloat16",
        max_logprobs=args.k,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=args.max_length + 8,
        seed=0,
        enable_prefix_caching=False,
    )
    sp = SamplingParams(max_tokens=1, prompt_logprobs=args.k, flat_logprobs=True, detokenize=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t0
    all_ids, all_lps = [], []
    for out in outs:
        ids, lps, _, _ = dense_prompt_topk(out.prompt_logprobs, args.k)
        all_ids.append(ids)
        all_lps.append(lps)
    ids, lps = np.concatenate(all_ids), np.concatenate(all_lps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, ids=ids, logprobs=lps)
    print(f"{len(ids)} positions x k={args.k} from {len(rows)} rows in {dt:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
