"""Cache -> packed training batches: split, stream, pack, align the teacher rows with the student.

    readers = [CacheReader(path, rank=r, world_size=w, shuffle=True)]
    stream = ExampleStream(readers, split="train", eval_fraction=0.01)
    for batch in Packer(stream, max_tokens=4096, k=cache_k(readers)):   # PackedBatch
        hidden = student(batch.input_ids, batch.position_ids)[0]     # [S, D]
        loss, metrics = kd_loss(hidden, W, batch.topk_ids, batch.topk_logprobs, batch.labels, ...)

Packing: examples are concatenated into one sequence of at most `max_tokens` tokens, with
position ids restarting at 0 for each example. transformers (>= 4.53) reads restarting position
ids with `attention_mask=None` as packed sequences and masks attention across them (block-diagonal
causal mask for sdpa/eager, varlen for flash-attention), so no example sees another.

Alignment: row n of an example's teacher arrays predicts token t = target_positions[n] from tokens
< t; the student predicts token t from its hidden state at position t-1. So in the packed sequence
row `offset + t - 1` carries labels = input_ids[t] and the teacher's top-k for t; every other row
has labels IGNORE_INDEX (-100) and padding (-1 ids, -inf logprobs).

Checks: every example the stream hands out passed `check_example_fits_student` (target spans inside the
sequence, sorted, one teacher row each; ids inside the student's embedding and LM head), since a
cache read over hf:// may never have been verified.

Exact resume: `stream.state_dict()` is the cursor *before* the example the packer holds over for
the next batch, so a checkpoint taken between batches loses and repeats nothing.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from formats import IGNORE_INDEX, CacheReader, Example, FormatError, IncompatibleCachesError, InputError
from formats.ids import is_eval, keep_fraction, record_id
from formats.manifest import manifest_get
from formats.shard import check_example
from formats.tools import COMPAT_KEYS

log = logging.getLogger("train_student")

TEACHER_KEYS = [key for key in COMPAT_KEYS if key[0] == "teacher"]  # what makes two caches one teacher's
MIN_K = 16           # below this many teacher entries per position, the KD signal is thin
MAX_TAIL_MASS = 0.3  # mean teacher mass outside the cached entries above which we warn


# ---- safety checks -------------------------------------------------------------------------------
def check_cache_fits_student(manifest: dict, where: str, *, fingerprint: str | None, tokenizer_vocab: int | None,
                             output_size: int) -> None:
    """Refuse a cache whose token ids would mean something else to the student (InputError).

    `output_size` is the student's LM head rows. The cache's tokens (tokenizer.vocab_size) must fit
    it; the teacher's own output size (teacher.output_size, when the manifest records it) may be
    larger (a padded output layer): then only a warning, and `check_example_fits_student` refuses an id that is
    actually out of range. The format version was already checked by `load_manifest`.
    """
    tok = manifest.get("tokenizer") or {}
    cache_vocab = tok.get("vocab_size")
    if cache_vocab is not None and tokenizer_vocab is not None and int(cache_vocab) != int(tokenizer_vocab):
        raise InputError(
            f"{where}: the cache was made with a tokenizer of {cache_vocab} tokens "
            f"({tok.get('name_or_path', '?')}), the student's tokenizer has {tokenizer_vocab}; "
            "train a student that shares the teacher's tokenizer")
    if cache_vocab is not None and int(cache_vocab) > output_size:
        raise InputError(f"{where}: the cache's vocabulary has {cache_vocab} tokens but the student's LM head "
                         f"has only {output_size} rows")
    teacher_out = (manifest.get("teacher") or {}).get("output_size")
    if teacher_out is not None and int(teacher_out) > output_size:
        log.warning("%s: the teacher's output layer has %d rows, the student's %d: a cached teacher id >= %d "
                    "(padding rows past the tokenizer's %s tokens) stops training with an error",
                    where, int(teacher_out), output_size, output_size, cache_vocab)
    if tok.get("fingerprint") and fingerprint and tok["fingerprint"] != fingerprint:
        raise InputError(
            f"{where}: tokenizer fingerprints differ (cache {tok['fingerprint'][:12]}… from "
            f"{tok.get('name_or_path', '?')}, student {fingerprint[:12]}…): same vocabulary size "
            "but different tokens or special tokens; use the teacher's tokenizer")
    if not tok.get("fingerprint"):
        log.warning("%s: the manifest has no tokenizer fingerprint; cannot check the student's tokenizer", where)


def check_example_fits_student(ex: Example, where: str, *, input_size: int | None = None,
                               output_size: int | None = None) -> None:
    """Refuse an example the student would misread, before it reaches a batch (cheap: one pass over its ids).

    Target spans must lie in 1..L-1, sorted, with one teacher row per position (else a label and a
    teacher row land on the wrong token): FormatError. Token ids must index the student's embedding
    (`input_size`) and labels and teacher ids its LM head (`output_size`), else the loss kernel
    reads out of bounds: InputError. A cache read over hf:// may never have been verified.
    """
    where = f"{where}, example {ex.id!r}"
    try:
        check_example(ex)
    except ValueError as exc:
        raise FormatError(f"{where}: {exc}; the cache is damaged, run `kdcache verify` on it") from None
    ids, teacher = ex.input_ids, ex.topk_ids
    if len(ids) and ids.min() < 0:
        raise FormatError(f"{where}: negative token id {int(ids.min())}; run `kdcache verify` on the cache")
    if teacher.size and teacher.min() < -1:
        raise FormatError(f"{where}: teacher id {int(teacher.min())} (only -1 pads); run `kdcache verify` on the cache")
    if input_size is not None and len(ids) and ids.max() >= input_size:
        raise InputError(f"{where}: token id {int(ids.max())} >= the student's {input_size} embedding rows")
    if output_size is not None:
        labels = ids[ex.target_positions]
        if len(labels) and labels.max() >= output_size:
            raise InputError(f"{where}: label token id {int(labels.max())} >= the student's {output_size} LM head rows")
        if teacher.size and teacher.max() >= output_size:
            raise InputError(f"{where}: teacher id {int(teacher.max())} >= the student's {output_size} LM head rows; "
                             "the cache's teacher has a larger output layer than the student")


def check_same_teacher(manifests: list[dict], paths: list[str], stage: str, *, allow_mixed: bool) -> None:
    """Refuse a stage that mixes caches of different teachers (IncompatibleCachesError) unless allowed."""
    first = manifests[0]
    for m, path in zip(manifests[1:], paths[1:]):
        for key in TEACHER_KEYS:
            a, b = manifest_get(first, key), manifest_get(m, key)
            if a == b:
                continue
            if allow_mixed:
                log.warning("stage %s mixes teachers: %s has %s=%r, %s has %r (allow_mixed_teachers)", stage,
                            path, ".".join(key), b, paths[0], a)
                continue
            raise IncompatibleCachesError(
                f"stage {stage}: {path} and {paths[0]} come from different teachers ({'.'.join(key)} {b!r} vs "
                f"{a!r}); one stage distils one teacher: put them in separate stages, or set "
                "allow_mixed_teachers: true (--allow-mixed-teachers) to mix them on purpose")


def check_signal(reader: CacheReader, where: str, sample: int = 64) -> dict:
    """Warn when the cached teacher signal is thin (small k, much mass outside the top-k).

    Returns {"k", "mean_tail_mass"} (tail mass over the first `sample` examples)."""
    k = int(reader.manifest["codec"]["k"])
    if k < MIN_K:
        log.warning("%s: the cache keeps only k=%d teacher entries per position (< %d): the KD signal is thin",
                    where, k, MIN_K)
    tails = []
    for i, ex in enumerate(reader):
        if ex.num_targets:
            tails.append(ex.tail_mass)
        if i + 1 >= sample:
            break
    tail = float(np.concatenate(tails).mean()) if tails else 0.0
    if tail > MAX_TAIL_MASS:
        log.warning("%s: the teacher's top-%d misses %.0f%% of its probability mass on average (> %.0f%%); "
                    "consider tail='bucket' or a cache with larger k", where, k, 100 * tail, 100 * MAX_TAIL_MASS)
    return {"k": k, "mean_tail_mass": tail}


# ---- streaming -----------------------------------------------------------------------------------
class ExampleStream:
    """Examples of one split from one or more readers, mixed round-robin, with an exact cursor.

    Every example handed out passed `check_example_fits_student` (against the student's sizes when given).
    """

    def __init__(self, readers: list[CacheReader], *, split: str = "train", eval_fraction: float = 0.0,
                 fraction: float = 1.0, input_size: int | None = None, output_size: int | None = None):
        if split not in ("train", "eval", "all"):
            raise ValueError(f"split must be train, eval or all, got {split!r}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.readers, self.split, self.eval_fraction = readers, split, eval_fraction
        self.fraction = fraction  # training subsample (data-size sweeps); never applied to the held-out split
        self.input_size, self.output_size = input_size, output_size
        self._turn = 0
        self._done = [False] * len(readers)
        self._iters: list | None = None
        self._skipped = [0] * len(readers)  # examples filtered out in a row, per reader

    def _keep(self, ex: Example) -> bool:
        return self._keep_id(ex.id)

    def _keep_id(self, example_id: str) -> bool:
        if self.split == "all":
            return True
        held_out = is_eval(example_id, self.eval_fraction)
        if self.split == "eval":
            return held_out
        # the same nested subsample as `kdcache cache --fraction F` (seed 0) takes of the records
        return not held_out and keep_fraction(record_id(example_id), self.fraction, 0)

    def __iter__(self):
        return self

    def __next__(self) -> Example:
        if self._iters is None:
            self._iters = [iter(r) for r in self.readers]
        while not all(self._done):
            i = self._turn
            if self._done[i]:
                self._turn = (i + 1) % len(self.readers)
                continue
            try:
                ex = next(self._iters[i])
            except StopIteration:
                self._done[i] = True
                continue
            if self._keep(ex):
                self._skipped[i] = 0
                self._turn = (i + 1) % len(self.readers)
                check_example_fits_student(ex, self.readers[i].path, input_size=self.input_size,
                                           output_size=self.output_size)
                return ex
            self._skip(i)
        raise StopIteration

    def _skip(self, i: int) -> None:
        """Count a filtered-out example; an endless reader with nothing to keep would spin forever.

        2n - 1 examples in a row hold a whole epoch of this rank's n. Without shuffling every epoch
        is the same slice, so such a run is an error; with shuffling each epoch deals a new slice, so
        it is an error only when the whole cache (every rank's share) holds nothing to keep."""
        self._skipped[i] += 1
        reader = self.readers[i]
        if reader.epochs is None and self._skipped[i] >= 2 * max(reader.num_examples(), 1):
            if reader.shuffle and any(map(self._keep_id, reader.example_ids())):
                self._skipped[i] = 0  # this epoch's slice had none; a later one will
                return
            raise InputError(f"{reader.path}: no example of this process's share is in the split {self.split!r} "
                             f"(eval_fraction={self.eval_fraction}, fraction={self.fraction}): a whole epoch was "
                             "filtered out and the stage repeats epochs forever; lower eval_fraction, raise fraction "
                             "or drop the cache from the stage")

    def state_dict(self) -> dict:
        return {"readers": [r.state_dict() for r in self.readers], "turn": self._turn, "done": list(self._done)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["readers"]) != len(self.readers):
            raise InputError(f"checkpoint was made with {len(state['readers'])} caches in this stage, "
                             f"the config has {len(self.readers)}; resume with the same caches")
        for reader, s in zip(self.readers, state["readers"]):
            try:
                reader.load_state_dict(s)
            except ValueError as exc:  # a different cache, seed, shuffle or number of processes
                raise InputError(f"cannot resume reading {reader.path}: {exc}") from None
        self._turn, self._done, self._iters = state["turn"], list(state["done"]), None
        self._skipped = [0] * len(self.readers)


# ---- packing -------------------------------------------------------------------------------------
@dataclass
class PackedBatch:
    """One packed sequence (batch size 1). S tokens, K teacher entries per row.

    input_ids, position_ids: int64 [1, S]; labels: int64 [S] (next token, IGNORE_INDEX = not trained);
    topk_ids: int64 [S, K] (-1 = none); topk_logprobs: float32 [S, K] (-inf = none).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    n_examples: int
    truncated: int = 0  # examples cut to max_tokens

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(move(self.input_ids), move(self.position_ids), move(self.labels), move(self.topk_ids),
                           move(self.topk_logprobs), self.n_examples, self.truncated)


def pack_batch(examples: list[Example], k: int, max_tokens: int | None = None) -> PackedBatch:
    """Pack `examples` (in order) into one sequence; each is cut to `max_tokens` tokens if longer."""
    ids, pos, labels, tids, tlps = [], [], [], [], []
    truncated = 0
    for ex in examples:
        L = len(ex.input_ids)
        tp = ex.target_positions.astype(np.int64)
        t_ids, t_lps = ex.topk_ids, ex.topk_logprobs
        if max_tokens is not None and L > max_tokens:
            L, truncated = max_tokens, truncated + 1
            keep = tp < L
            tp, t_ids, t_lps = tp[keep], t_ids[keep], t_lps[keep]
        lab = np.full(L, IGNORE_INDEX, np.int64)
        row_ids = np.full((L, k), -1, np.int64)
        row_lps = np.full((L, k), -np.inf, np.float32)
        rows = tp - 1  # hidden row t-1 predicts token t
        lab[rows] = ex.input_ids[tp]
        kk = min(k, t_ids.shape[1]) if t_ids.ndim == 2 else 0
        row_ids[rows, :kk] = t_ids[:, :kk]
        row_lps[rows, :kk] = t_lps[:, :kk]
        ids.append(ex.input_ids[:L].astype(np.int64))
        pos.append(np.arange(L, dtype=np.int64))
        labels.append(lab)
        tids.append(row_ids)
        tlps.append(row_lps)
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate(ids))[None],
        position_ids=torch.from_numpy(np.concatenate(pos))[None],
        labels=torch.from_numpy(np.concatenate(labels)),
        topk_ids=torch.from_numpy(np.concatenate(tids)),
        topk_logprobs=torch.from_numpy(np.concatenate(tlps)),
        n_examples=len(examples),
        truncated=truncated,
    )


class Packer:
    """Greedy packing of a stream into sequences of at most `max_tokens` tokens.

    `stream` is an ExampleStream, or any iterator of examples when no cursor is needed (`eval_batches`).
    `state_dict()` between batches is the stream's cursor before the held-over example.
    """

    def __init__(self, stream: ExampleStream | Iterator[Example], *, max_tokens: int, k: int):
        self.stream, self.max_tokens, self.k = stream, max_tokens, k
        self._pending: Example | None = None
        self._pending_state: dict | None = None

    def __iter__(self):
        return self

    def _pull(self) -> Example | None:
        if self._pending is not None:
            ex, self._pending, self._pending_state = self._pending, None, None
            return ex
        try:
            return next(self.stream)
        except StopIteration:
            return None

    def __next__(self) -> PackedBatch:
        first = self._pull()
        if first is None:
            raise StopIteration
        batch, used = [first], min(len(first.input_ids), self.max_tokens)
        while used < self.max_tokens:
            state = self.stream.state_dict() if isinstance(self.stream, ExampleStream) else None
            ex = self._pull()
            if ex is None:
                break
            if used + len(ex.input_ids) > self.max_tokens:
                self._pending, self._pending_state = ex, state
                break
            batch.append(ex)
            used += len(ex.input_ids)
        return pack_batch(batch, self.k, self.max_tokens)

    def state_dict(self) -> dict:
        return self._pending_state if self._pending is not None else self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._pending = self._pending_state = None
        self.stream.load_state_dict(state)


def open_readers(paths: list[str], *, rank: int, world_size: int, shuffle: bool, seed: int,
                 epochs: int | None, max_examples: int | None, drop_remainder: bool = True) -> list[CacheReader]:
    readers = []
    for p in paths:
        try:
            readers.append(CacheReader(p, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed,
                                       epochs=epochs, max_examples=max_examples, drop_remainder=drop_remainder))
        except FileNotFoundError as exc:
            raise InputError(f"cache {p} not found ({exc})") from None
    return readers


def cache_k(readers: list[CacheReader]) -> int:
    return max(int(r.manifest["codec"]["k"]) for r in readers)


def eval_batches(paths: list[str], *, rank: int, world_size: int, eval_fraction: float, max_tokens: int,
                 max_examples: int | None, input_size: int | None = None,
                 output_size: int | None = None) -> list[PackedBatch]:
    """The held-out split of `paths` for this rank, packed once and kept in memory."""
    if eval_fraction <= 0:
        return []
    readers = open_readers(paths, rank=rank, world_size=world_size, shuffle=False, seed=0, epochs=1,
                           max_examples=None, drop_remainder=False)  # every held-out example, on any world size
    stream = ExampleStream(readers, split="eval", eval_fraction=eval_fraction, input_size=input_size,
                           output_size=output_size)
    return list(Packer(itertools.islice(stream, max_examples), max_tokens=max_tokens, k=cache_k(readers)))
