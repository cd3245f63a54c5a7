"""The default teacher engine: `vllm.LLM` over token-id prompts, top-k from vLLM's flat logprob arrays.

Score mode asks for `prompt_logprobs=k` (one generated token, discarded); generate mode samples with
`logprobs=k`. Both come back as `FlatLogprobs` with k + 1 entries per position, the actual (or
sampled) token first; `dense_prompt_topk` turns them into numpy arrays without per-token objects.

vLLM starts its workers with spawn: a script that builds this engine needs `if __name__ == "__main__":`.
"""
from __future__ import annotations

import os

import numpy as np

from cache_teacher.data import stable_hash
from cache_teacher.engines.base import Generated, Scored
from cache_teacher.engines.vllm_logprobs import dense_prompt_topk


class _Leading:
    """A FlatLogprobs view with an empty position 0 prepended, for logprobs of generated tokens
    (where position 0 already has entries) so `dense_prompt_topk(first=1)` reads all positions."""

    def __init__(self, flat):
        starts = np.asarray(flat.start_indices, dtype=np.int64)
        first = starts[:1] if len(starts) else np.zeros(1, np.int64)
        self.start_indices = np.concatenate([first, starts])
        self.end_indices = np.concatenate([first, np.asarray(flat.end_indices, dtype=np.int64)])
        self.token_ids, self.logprobs, self.ranks = flat.token_ids, flat.logprobs, flat.ranks


class VLLMEngine:
    name = "vllm"

    def __init__(self, config):
        if config.kv_cache_space_gb is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.kv_cache_space_gb)
        import vllm

        self.config = config
        self.version = vllm.__version__
        max_model_len = config.max_model_len
        if max_model_len is None and config.max_length is not None:
            # score: the conversation plus the one token vLLM must generate; generate: prompt + response
            max_model_len = config.max_length + (config.max_new_tokens if config.mode == "generate" else 1)
        kwargs = dict(
            model=config.teacher,
            tokenizer=config.tokenizer_path,
            revision=config.revision,
            dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            max_logprobs=max(config.k, 1),
            max_model_len=max_model_len,
            enforce_eager=config.enforce_eager,
            seed=config.seed,
        )
        if config.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        if config.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
        if config.tensor_parallel_size > 1:
            # one worker = one node's GPUs; inside a Ray task vLLM would otherwise pick its Ray backend
            kwargs["distributed_executor_backend"] = "mp"
        self.llm = vllm.LLM(**{key: value for key, value in kwargs.items() if value is not None})
        self._counter = 0  # request ids

    def info(self) -> dict:
        c = self.config
        return {"name_or_path": c.teacher, "revision": c.revision, "dtype": c.dtype, "engine": "vllm",
                "engine_version": self.version, "tensor_parallel_size": c.tensor_parallel_size}

    def _prompts(self, items):
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=item.input_ids.tolist()) for item in items]

    def _run(self, items, params, extract) -> list:
        """Run one request per item and return `extract(item, output)` per item, in item order.

        Like `LLM.generate`, but each output is turned into numpy arrays as soon as its request
        finishes and then dropped: vLLM holds logprobs as Python lists (~60 bytes per entry, so a
        batch of 4,096 Tulu rows at k=64 would hold ~10 GB until the whole batch is done)."""
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        prompts = self._prompts(items)
        index: dict[str, int] = {}  # our request id (outputs carry it) -> item
        internal: dict[str, str] = {}  # our request id -> vLLM's internal one (what abort takes)
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                p.output_kind = RequestOutputKind.FINAL_ONLY
                self._counter += 1
                rid = f"kdcache-{self._counter}"
                internal[rid] = engine.add_request(rid, prompt, p)
                index[rid] = i
            results: list = [None] * len(items)
            left = len(items)
            while left and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        i = index.pop(out.request_id)
                        internal.pop(out.request_id, None)
                        results[i] = extract(items[i], out)
                        left -= 1
        except BaseException:
            if internal:
                engine.abort_request(list(internal.values()), internal=True)
            raise
        if left:
            raise RuntimeError(f"vLLM finished with {left} of {len(items)} requests unanswered")
        return results

    def score(self, items, config=None) -> list[Scored]:
        """Teacher-forced top-k at each item's target positions, in item order."""
        from vllm import SamplingParams

        k = (config or self.config).k

        def extract(item, out) -> Scored:
            ids, lps, act_lp, act_rank = dense_prompt_topk(out.prompt_logprobs, k)
            rows = item.target_positions.astype(np.int64) - 1  # row r predicts token r + 1
            return Scored(ids[rows], lps[rows], act_lp[rows], act_rank[rows])

        params = [SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True, detokenize=False) for _ in items]
        return self._run(items, params, extract)

    def generate(self, items, stop_ids, config=None) -> list[list[Generated]]:
        """`n` sampled responses per item (prompt ids in item.input_ids), stopping after any of stop_ids."""
        from vllm import SamplingParams

        c = config or self.config

        def extract(item, out) -> list[Generated]:
            samples = []
            for completion in sorted(out.outputs, key=lambda o: o.index):
                tokens = np.asarray(completion.token_ids, np.int32)
                ids, lps, act_lp, act_rank = dense_prompt_topk(_Leading(completion.logprobs), c.k)
                reason = "stop" if completion.finish_reason == "stop" else "length"
                samples.append(Generated(tokens, Scored(ids, lps, act_lp, act_rank), reason))
            return samples

        params = [
            SamplingParams(n=c.n, temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_new_tokens,
                           logprobs=c.k, flat_logprobs=True, detokenize=False, stop_token_ids=sorted(stop_ids),
                           seed=stable_hash(item.id, f"sample:{c.seed}") % (2**31))
            for item in items
        ]
        return self._run(items, params, extract)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
