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

The summary lives in summary.py, the manifest's provenance in provenance.py, the dry run in dry_run.py
and the background writer in writer_thread.py.
"""

from __future__ import annotations

import time

from cache_teacher.data import iter_records
from cache_teacher.dry_run import dry_run
from cache_teacher.provenance import codec_config, provenance, teacher_tokenizer
from cache_teacher.summary import Summary, per_input
from formats.template import ChatTemplater, TemplateReject
from cache_teacher.writer_thread import WriterThread
from formats.errors import InputError
from formats.ids import sample_ids
from formats.manifest import reason_code
from formats.common.prefetch import prefetch
from formats.tokenizer_files import save_tokenizer_files


def run_cache(config, engine=None, tokenizer=None) -> Summary:
    """Write (or finish) the cache of `config`; returns the run's summary (a dry run's with `dry_run`).

    `engine` may be an already started engine (tests share one across runs); else one is started
    when the first batch needs it, so a rerun of a finished cache never starts the teacher.
    """
    if config.dry_run:
        return dry_run(config, tokenizer)
    from cache_teacher.config import resolve_auto

    config = resolve_auto(config)  # engine, dtype: concrete for this machine, before the manifest records them
    started = time.perf_counter()
    upload = _store_upload(config)  # --out URL: what the store holds, checked before any work
    if upload is not None and upload.complete is not None:
        return _complete_on_store(config, upload, tokenizer, started)
    tokenizer = tokenizer or teacher_tokenizer(config)
    templater = ChatTemplater(tokenizer, config.max_length, config.length_policy)
    summary = Summary(
        out=str(config.out),
        per_input=per_input(config),
        teacher=f"{config.engine} engine ({config.engine_reason}), {config.dtype} ({config.dtype_reason})",
    )
    teacher = _Teacher(config, engine)
    progress = _Progress(config, summary, started)
    folder = config.out if upload is None else upload.staging
    try:
        prov = provenance(config, tokenizer, templater)
        # --out URL: the store is claimed once the writer has opened the folder, and committed shards go up
        # while the teacher works
        on_open = upload.start if upload is not None else None
        manifest = _write_cache(config, templater, prov, teacher, summary, progress, folder, on_open)
    finally:
        if upload is not None:
            upload.stop()
        progress.close()
        teacher.close()
    if upload is not None:
        upload.finish()  # the rest, manifest.json last
    summary.wall_s = time.perf_counter() - started
    summary.record_cache_size(manifest)
    return summary


def _store_upload(config):
    """For `--out URL` (formats/remote_write.py): the job's staging folder and mirror, with `complete` set
    to the store's manifest when the cache there is already complete; None for a local --out."""
    from formats.remote_write import CacheUpload, is_remote

    if not is_remote(config.out):
        return None
    upload = CacheUpload(config.out, staging=config.staging)
    upload.open()
    return upload


def _complete_on_store(config, upload, tokenizer, started: float) -> Summary:
    """The store already holds this job's complete cache: refuse other settings, else report it as done
    (no teacher starts), removing what an interrupted clean-up left beside it."""
    from cache_teacher.provenance import check_finished_cache

    manifest = upload.complete
    if not config.resume:
        raise InputError(f"{config.out} already holds a complete cache; write to a new prefix, or delete this one")
    check_finished_cache(config.out, config, tokenizer, manifest=manifest)
    upload.finish_complete()
    summary = Summary(out=str(config.out), per_input=per_input(config))
    counts = manifest.get("counts") or {}
    summary.inputs = summary.resumed = int(counts.get("examples", 0) + counts.get("rejects", 0)) // summary.per_input
    summary.record_cache_size(manifest)
    summary.wall_s = time.perf_counter() - started
    return summary


def _write_cache(
    config,
    templater,
    prov: dict,
    teacher: "_Teacher",
    summary: Summary,
    progress: "_Progress",
    folder=None,
    on_open=None,
) -> dict:
    """Every input record not done yet, written or rejected into `folder` (default: config.out); returns the
    finished cache's manifest. `on_open()` runs once the writer holds the folder, before the teacher starts."""
    import itertools

    from formats.writer import CacheWriter

    records = iter_records(config)
    first = next(records, None)  # opens the input: a dataset that cannot be read stops here, before any output
    records = itertools.chain([first] if first is not None else [], records)
    folder = config.out if folder is None else folder
    with CacheWriter(
        folder,
        codec=codec_config(config),
        provenance=prov,
        shard_max_bytes=config.shard_max_bytes,
        row_group_positions=config.row_group_positions,
        resume=config.resume,
    ) as writer:
        if on_open is not None:
            on_open()
        io = WriterThread(writer)
        batches = _Batches(config, teacher, templater, io, summary, progress)
        try:
            # templating runs ahead in a thread while the engine works on the previous batch
            for kind, value in prefetch(
                _prepared(config, templater, set(writer.done_ids), records), 2 * config.batch_size
            ):
                summary.inputs += 1
                if kind == "item":
                    summary.truncated += int(value.truncated)
                    batches.add(value)
                    continue
                if kind == "reject":
                    for rid, reason, source in value:
                        io.reject(rid, reason, source)
                        summary.rejects[reason_code(reason)] += 1
                else:
                    summary.resumed += 1
                progress.update(1)
            batches.flush()
        finally:
            io.drain()
        writer.inputs = summary.inputs * summary.per_input  # finish() checks examples + rejects == inputs
        if not writer.complete:  # the teacher's tokenizer travels with the cache (before the manifest)
            writer.manifest["tokenizer_files"] = save_tokenizer_files(templater.tokenizer, folder)
    return writer.manifest


def _prepared(config, templater, done: set[str], records):
    """Each input record (of `records`, cache_teacher.data.iter_records) as ("item", Templated), ("reject",
    [(id, reason, source), ...]) (one per unit id not yet done) or ("resumed", id). A record's unit ids: its
    own (score), its n sample ids (generate)."""
    for record, reject in records:
        rid = reject[0] if reject is not None else record["id"]
        todo = [uid for uid in sample_ids(rid, per_input(config)) if uid not in done]
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
        except (TypeError, ValueError, UnicodeError) as exc:  # the tokenizer on text it cannot encode: one record
            reason = f"tokenizer_error: {type(exc).__name__}: {str(exc)[:200]}"
            yield "reject", [(uid, reason, record["source"]) for uid in todo]
            continue
        if config.mode == "generate":
            item.wanted = set(todo)  # item.messages: the prompt's; score mode: the (bounded) conversation rendered
        yield "item", item


class _Batches:
    """Templated items collected into batches of `config.batch_size`; `flush` runs the teacher over the
    collected batch and hands its examples to the writer thread."""

    def __init__(
        self, config, teacher: "_Teacher", templater, io: WriterThread, summary: Summary, progress: "_Progress"
    ):
        self.config, self.teacher, self.templater = config, teacher, templater
        self.io, self.summary, self.progress = io, summary, progress
        self.items: list = []

    def add(self, item) -> None:
        self.items.append(item)
        if len(self.items) >= self.config.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        t0 = time.perf_counter()
        results = list(_examples(self.config, self.items, self.teacher.engine(), self.templater))
        self.summary.teacher_s += time.perf_counter() - t0
        for example, tokens in results:
            self.summary.examples += 1
            self.summary.positions += example.num_targets
            self.summary.tokens += tokens
        self.io.write_batch([example for example, _ in results])
        self.progress.update(len(self.items))
        self.items = []


def _examples(config, items, engine, templater):
    """Run the engine over a batch of templated items; yield (Example, tokens processed).

    Each example's meta["messages"] is the conversation its tokens render: the record's messages
    (score mode), or the prompt's plus the generated reply decoded as the assistant turn (generate
    mode, with meta["prompt_turns"] the prompt's length), so a student with another tokenizer can
    render the same conversation."""
    import numpy as np

    from formats.example import Example

    if config.mode == "score":
        for item, s in zip(items, engine.score(items, config)):
            yield (
                Example(
                    item.id,
                    item.input_ids,
                    item.target_positions,
                    s.topk_ids,
                    s.topk_logprobs,
                    s.target_logprobs,
                    s.target_ranks,
                    source=item.source,
                    meta={"messages": item.messages, **({"truncated": True} if item.truncated else {})},
                ),
                len(item.input_ids),
            )
        return
    for item, samples in zip(items, engine.generate(items, templater.eot_ids, config)):
        if len(samples) != config.n:
            raise RuntimeError(f"the engine returned {len(samples)} samples for {item.id!r}, n is {config.n}")
        wanted = item.wanted
        for j, (sid, g) in enumerate(zip(sample_ids(item.id, config.n), samples)):
            if wanted is not None and sid not in wanted:
                continue
            ids = np.concatenate([item.input_ids, g.token_ids]).astype(np.int32)
            positions = np.arange(len(item.input_ids), len(ids), dtype=np.int32)
            s = g.scored
            reply = {
                "role": "assistant",
                "content": templater.tokenizer.decode(np.asarray(g.token_ids).tolist(), skip_special_tokens=True),
            }
            meta = {
                "sample": j,
                "prompt_tokens": int(len(item.input_ids)),
                "prompt_turns": len(item.messages),
                "messages": [*item.messages, reply],
            }
            yield (
                Example(
                    sid,
                    ids,
                    positions,
                    s.topk_ids,
                    s.topk_logprobs,
                    s.target_logprobs,
                    s.target_ranks,
                    source=item.source,
                    finish_reason=g.finish_reason,
                    meta=meta,
                ),
                len(ids),
            )


class _Teacher:
    """The engine: the one given, else started on first use (so a rerun of a finished cache never starts
    it); `close` closes only an engine started here."""

    def __init__(self, config, engine=None):
        self.config, self._engine, self._own = config, engine, engine is None

    def engine(self):
        if self._engine is None:
            from cache_teacher.engines.factory import load_engine

            self._engine = load_engine(self.config)
        return self._engine

    def close(self) -> None:
        if self._own and self._engine is not None:
            self._engine.close()


class _Progress:
    """A tqdm bar over input records (written, rejected or done earlier), with an ETA when the input size
    is known and tokens/s in its postfix; does nothing without `config.progress`."""

    def __init__(self, config, summary: Summary, started: float):
        self.summary, self.started, self.bar = summary, started, None
        if config.progress:
            from tqdm.auto import tqdm

            from cache_teacher.data import expected_inputs

            self.bar = tqdm(total=expected_inputs(config), unit="ex", desc=f"teacher {config.mode}", dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is None:
            return
        self.bar.update(n)
        elapsed = time.perf_counter() - self.started
        self.bar.set_postfix(tok_s=f"{self.summary.tokens / elapsed:.0f}", rejects=sum(self.summary.rejects.values()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
