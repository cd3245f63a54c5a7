"""`kdcache cache --dry-run`: template every record, count tokens and positions, and estimate the cache's
size and the teacher's time, without starting the teacher."""

from __future__ import annotations

import time
from dataclasses import dataclass

from cache_teacher.data import iter_records
from cache_teacher.provenance import teacher_tokenizer
from cache_teacher.summary import Summary, per_input
from formats.template import ChatTemplater, TemplateReject
from formats.manifest import reason_code

# Dry-run assumptions when --dry-run-tokens-per-s is not given: SmolLM2-135M with k=64 on a 2-core CPU
# (vLLM bf16 measured 790-960 tokens/s, hf fp32 about 150); pass a measured rate for a GPU.
DEFAULT_TOKENS_PER_S = {"vllm": 800.0, "hf": 150.0}


@dataclass
class DryRun(Summary):
    """A Summary of counts only (nothing written), whose report is the size and time estimate."""

    mode: str = "score"
    k: int = 0
    worker: str = "0/1"
    tokens_per_s: float = 0.0

    def report(self) -> str:
        # codec v1 stores about one gap byte and one step byte per entry plus ~5 bytes per position
        # before zstd; real caches come out smaller (see `kdcache bench codec`).
        bytes_per_position = 2 * self.k + 5
        est_bytes = self.positions * bytes_per_position
        est_s = self.tokens / self.tokens_per_s
        return "\n".join(
            [
                f"dry run over {self.inputs} inputs ({self.mode} mode, worker {self.worker})",
                f"examples {self.examples}, rejects {sum(self.rejects.values())} {dict(self.rejects)}, "
                f"truncated {self.truncated}",
                f"tokens {self.tokens}, trained positions {self.positions}"
                + (" (upper bound: full-length responses)" if self.mode == "generate" else ""),
                f"estimated cache size <= {_human(est_bytes)} (~{bytes_per_position} B/position at k={self.k})",
                f"estimated teacher time {est_s / 3600:.2f} h at {self.tokens_per_s:.0f} tokens/s per worker "
                f"(pass --dry-run-tokens-per-s with a measured rate)",
            ]
        )


def dry_run(config, tokenizer=None) -> DryRun:
    """Template everything of this worker's slice and count what the teacher would process and the cache hold."""
    from cache_teacher.config import resolve_auto

    config = resolve_auto(config)  # the engine picks the default rate
    started = time.perf_counter()
    tokenizer = tokenizer or teacher_tokenizer(config)
    templater = ChatTemplater(tokenizer, config.max_length, config.length_policy)
    summary = DryRun(
        out=str(config.out),
        per_input=per_input(config),
        mode=config.mode,
        k=config.k,
        worker=f"{config.worker_index}/{config.num_workers}",
        tokens_per_s=config.dry_run_tokens_per_s or DEFAULT_TOKENS_PER_S[config.engine],
    )
    for record, reject in iter_records(config):
        summary.inputs += 1
        if reject is not None:
            summary.rejects[reason_code(reject[1])] += summary.per_input
            continue
        try:
            item = templater.score(record) if config.mode == "score" else templater.prompt(record)
        except TemplateReject as exc:
            summary.rejects[reason_code(exc.reason)] += summary.per_input
            continue
        summary.examples += summary.per_input
        summary.truncated += int(item.truncated)
        if config.mode == "score":
            summary.positions += len(item.target_positions)
            summary.tokens += len(item.input_ids)
        else:  # upper bound: every response runs to max_new_tokens
            summary.positions += config.n * config.max_new_tokens
            summary.tokens += config.n * (len(item.input_ids) + config.max_new_tokens)
    summary.wall_s = time.perf_counter() - started
    return summary


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
