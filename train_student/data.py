"""Cache -> packed training batches: split, stream, pack, align the teacher rows with the student.

    readers = open_readers([cache], rank=0, world_size=1, shuffle=True, seed=0, epochs=1, max_examples=None)
    stream = ExampleStream(readers, split="train", eval_fraction=0.01)
    loss_fn = StudentLoss(student)                                     # train_student.model
    for batch in Packer(stream, max_tokens=4096, k=cache_k(readers)):  # PackedBatch
        loss, metrics = loss_fn(batch.input_ids, batch.position_ids, batch.topk_ids, batch.topk_logprobs,
                                batch.labels, spec=LossSpec(kd_weight=1.0))  # train_student.loss_options

Packing: examples are concatenated into one sequence of at most `max_tokens` tokens, with
position ids restarting at 0 for each example. transformers (>= 4.53) reads restarting position
ids with `attention_mask=None` as packed sequences and masks attention across them (block-diagonal
causal mask for sdpa/eager, varlen for flash-attention), so no example sees another.

Alignment: row n of an example's teacher arrays predicts token t = target_positions[n] from tokens
< t; the student predicts token t from its hidden state at position t-1. So in the packed sequence
row `offset + t - 1` carries labels = input_ids[t] and the teacher's top-k for t; every other row
has labels IGNORE_INDEX (-100) and padding (-1 ids, -inf logprobs).

Checks: every example the stream hands out passed `checks.check_example_fits_student` (target spans
inside the sequence, sorted, one teacher row each; ids inside the student's embedding and LM head),
since a cache read over hf:// may never have been verified.

Exact resume: `stream.state_dict()` is the cursor *before* the example the packer holds over for
the next batch, so a checkpoint taken between batches loses and repeats nothing.

A student with another tokenizer (`--cross-tokenizer`): `AlignedStream` wraps the stream and turns
each cached example into the student's (`align.align_stream`, in a background thread ahead of the
step), keeping the exact cursor; `eval_batches(..., align=...)` aligns the held-out examples the same
way. Aligned examples are checked against the student's sizes (`checks.check_ids_fit_student`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from formats import IGNORE_INDEX, CacheReader, Example, InputError
from formats.batch import concat_rows, example_rows
from formats.ids import is_eval, keep_fraction, record_id
from train_student.checks import check_example_fits_student, check_ids_fit_student
from train_student.config import LONG_EXAMPLES


def in_split(example_id: str, split: str, eval_fraction: float, fraction: float = 1.0, seed: int = 0) -> bool:
    """Whether an example belongs to `split` ("train", "eval" or "all"): the held-out split is a hash of
    the id (formats.ids.is_eval); the training split may be subsampled to `fraction`, the same nested
    subsample `kdcache cache --fraction F` (seed 0, the default) takes of the records. The one split rule
    of `kdcache train` and `train_student.hf`."""
    if split == "all":
        return True
    held_out = is_eval(example_id, eval_fraction)
    if split == "eval":
        return held_out
    return not held_out and keep_fraction(record_id(example_id), fraction, seed)


# ---- streaming -----------------------------------------------------------------------------------
class ExampleStream:
    """Examples of one split from one or more readers, mixed round-robin, with an exact cursor.

    Every example handed out passed `check_example_fits_student` (against the student's sizes when given).
    """

    def __init__(
        self,
        readers: list[CacheReader],
        *,
        split: str = "train",
        eval_fraction: float = 0.0,
        fraction: float = 1.0,
        input_size: int | None = None,
        output_size: int | None = None,
    ):
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
        return in_split(example_id, self.split, self.eval_fraction, self.fraction)

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
                check_example_fits_student(
                    ex, self.readers[i].path, input_size=self.input_size, output_size=self.output_size
                )
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
            raise InputError(
                f"{reader.path}: no example of this process's share is in the split {self.split!r} "
                f"(eval_fraction={self.eval_fraction}, fraction={self.fraction}): a whole epoch was "
                "filtered out and the stage repeats epochs forever; lower eval_fraction, raise fraction "
                "or drop the cache from the stage"
            )

    def state_dict(self) -> dict:
        return {"readers": [r.state_dict() for r in self.readers], "turn": self._turn, "done": list(self._done)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["readers"]) != len(self.readers):
            raise InputError(
                f"checkpoint was made with {len(state['readers'])} caches in this stage, "
                f"the config has {len(self.readers)}; resume with the same caches"
            )
        for reader, s in zip(self.readers, state["readers"]):
            try:
                reader.load_state_dict(s)
            except ValueError as exc:  # a different cache, seed, shuffle or number of processes
                raise InputError(f"cannot resume reading {reader.path}: {exc}") from None
        self._turn, self._done, self._iters = state["turn"], list(state["done"]), None
        self._skipped = [0] * len(self.readers)


class AlignedStream:
    """An ExampleStream whose examples are aligned to a student with another tokenizer.

    `aligner`, `vmap`, `mode` as in `align.student_example`; alignment runs `ahead` examples in advance
    in a background thread (`align.align_stream`). `state_dict()` is the wrapped stream's cursor just
    after the last example handed out (taken in that thread with each example), so resuming neither
    skips nor repeats the examples read ahead. Each aligned example must fit the student's embedding
    (`input_size`) and LM head (`output_size`).
    """

    def __init__(
        self,
        stream: ExampleStream,
        aligner,
        vmap: np.ndarray,
        mode: str,
        *,
        input_size: int | None = None,
        output_size: int | None = None,
        ahead: int = 16,
    ):
        self.stream, self.aligner, self.vmap, self.mode, self.ahead = stream, aligner, vmap, mode, ahead
        self.input_size, self.output_size = input_size, output_size
        self._items = None  # the running align_stream
        self._state = None  # the cursor after the last example handed out (None: the stream's own)

    def __iter__(self):
        return self

    def __next__(self) -> Example:
        from train_student.xtok.align import align_stream

        if self._items is None:
            self._state = self.stream.state_dict()  # before the thread starts reading
            self._items = align_stream(
                self.stream, self.aligner, self.vmap, self.mode, self.ahead, cursor=self.stream.state_dict
            )
        ex, self._state = next(self._items)
        check_ids_fit_student(
            ex, f"example {ex.id!r} aligned to the student", input_size=self.input_size, output_size=self.output_size
        )
        return ex

    def state_dict(self) -> dict:
        return self._state if self._state is not None else self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.stream.load_state_dict(state)

    def close(self) -> None:
        """Stop the alignment thread (it restarts from the cursor on the next example)."""
        if self._items is not None:
            self._items.close()
        self._items, self._state = None, None


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
    dropped: int = 0  # trained positions past max_tokens in those (not trained)
    skipped: int = 0  # examples pulled before this batch that had nothing to train within max_tokens
    targets: int | None = None  # trained positions, counted when packed (None: counted from labels)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_targets(self) -> int:
        """Trained positions: known from packing, so reading it never waits for a device."""
        if self.targets is None:
            self.targets = int((self.labels != IGNORE_INDEX).sum())
        return self.targets

    def to(self, device) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(
            move(self.input_ids),
            move(self.position_ids),
            move(self.labels),
            move(self.topk_ids),
            move(self.topk_logprobs),
            self.n_examples,
            self.truncated,
            self.dropped,
            self.skipped,
            self.n_targets,  # counted on the host before the move
        )


def pack_batch(examples: list[Example], k: int, max_tokens: int | None = None) -> PackedBatch:
    """Pack `examples` (in order) into one sequence; each is cut to `max_tokens` tokens if longer.

    The examples' rows (formats.batch.example_rows, row t = token t) end to end, then shifted by one so
    that row t-1, whose hidden state predicts token t, carries token t's label and teacher row."""
    rows = [example_rows(ex, k, max_tokens) for ex in examples]
    seq = concat_rows(rows)
    labels = _shift(seq["labels"], IGNORE_INDEX)
    return PackedBatch(
        input_ids=torch.from_numpy(seq["input_ids"])[None],
        position_ids=torch.from_numpy(seq["position_ids"])[None],
        labels=torch.from_numpy(labels),
        topk_ids=torch.from_numpy(_shift(seq["topk_ids"].astype(np.int64), -1)),
        topk_logprobs=torch.from_numpy(_shift(seq["topk_logprobs"], -np.inf)),
        n_examples=len(examples),
        truncated=sum(r.truncated for r in rows),
        dropped=sum(r.dropped for r in rows),
        targets=int((labels != IGNORE_INDEX).sum()),
    )


def _shift(a: np.ndarray, fill) -> np.ndarray:
    """Row t-1 <- row t; the last row gets `fill` (row 0 of every example is never trained, so no
    example's row receives the next example's)."""
    out = np.empty_like(a)
    out[:-1], out[-1:] = a[1:], fill
    return out


class Packer:
    """Greedy packing of a stream into sequences of at most `max_tokens` tokens.

    `stream` is an ExampleStream (or AlignedStream), or any iterator of examples when no cursor is
    needed (`eval_batches`).
    `state_dict()` between batches is the stream's cursor before the held-over example.

    An example longer than `max_tokens` is cut to its first max_tokens tokens (`long_examples="truncate"`:
    its trained positions past the cut are dropped and counted in PackedBatch.dropped) or skipped
    (`"skip"`). An example with no trained position within max_tokens is always skipped (counted in
    PackedBatch.skipped), so no sequence trains nothing.
    """

    def __init__(
        self, stream: ExampleStream | Iterator[Example], *, max_tokens: int, k: int, long_examples: str = "truncate"
    ):
        if long_examples not in LONG_EXAMPLES:
            raise InputError(f"long_examples={long_examples!r}: one of {', '.join(LONG_EXAMPLES)}")
        self.stream, self.max_tokens, self.k, self.long_examples = stream, max_tokens, k, long_examples
        self._pending: Example | None = None
        self._pending_state: dict | None = None
        self._skipped = 0

    def __iter__(self):
        return self

    def _pull(self) -> Example | None:
        if self._pending is not None:
            ex, self._pending, self._pending_state = self._pending, None, None
            return ex
        while True:
            try:
                ex = next(self.stream)
            except StopIteration:
                return None
            long = len(ex.input_ids) > self.max_tokens
            if ex.num_targets and not (
                long and (self.long_examples == "skip" or ex.target_positions[0] >= self.max_tokens)
            ):
                return ex
            self._skipped += 1  # nothing it could train fits: never an empty sequence

    def __next__(self) -> PackedBatch:
        first = self._pull()
        if first is None:
            raise StopIteration
        batch, used = [first], min(len(first.input_ids), self.max_tokens)
        while used < self.max_tokens:
            state = self.stream.state_dict() if hasattr(self.stream, "state_dict") else None
            ex = self._pull()
            if ex is None:
                break
            if used + len(ex.input_ids) > self.max_tokens:
                self._pending, self._pending_state = ex, state
                break
            batch.append(ex)
            used += len(ex.input_ids)
        packed = pack_batch(batch, self.k, self.max_tokens)
        packed.skipped, self._skipped = self._skipped, 0
        return packed

    def state_dict(self) -> dict:
        return self._pending_state if self._pending is not None else self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._pending = self._pending_state = None
        self.stream.load_state_dict(state)


def open_readers(
    paths: list[str],
    *,
    rank: int,
    world_size: int,
    shuffle: bool,
    seed: int,
    epochs: int | None,
    max_examples: int | None,
    drop_remainder: bool = True,
    verify: bool = True,
) -> list[CacheReader]:
    """CacheReaders over `paths`; each shard's size and sha256 are checked as it is read (verify=False
    skips the hash, never the bounds and value checks every reader applies)."""
    readers = []
    for p in paths:
        try:
            readers.append(
                CacheReader(
                    p,
                    rank=rank,
                    world_size=world_size,
                    shuffle=shuffle,
                    seed=seed,
                    epochs=epochs,
                    max_examples=max_examples,
                    drop_remainder=drop_remainder,
                    verify=verify,
                )
            )
        except FileNotFoundError as exc:
            raise InputError(f"cache {p} not found ({exc})") from None
    return readers


def cache_k(readers: list[CacheReader]) -> int:
    return max(int(r.manifest["codec"]["k"]) for r in readers)


def eval_batches(
    paths: list[str],
    *,
    rank: int,
    world_size: int,
    eval_fraction: float,
    max_tokens: int,
    max_examples: int | None,
    input_size: int | None = None,
    output_size: int | None = None,
    align: Callable[[Example], Example] | None = None,
    verify: bool = True,
    long_examples: str = "truncate",
) -> list[PackedBatch]:
    """The held-out split of `paths` for this rank, packed once and kept in memory. `align`: a student
    with another tokenizer's `align.student_example` (bound to its aligner), applied to each held-out
    example; the aligned ones are checked against the student's sizes."""
    if eval_fraction <= 0:
        return []
    readers = open_readers(
        paths,
        rank=rank,
        world_size=world_size,
        shuffle=False,
        seed=0,
        epochs=1,
        max_examples=None,
        drop_remainder=False,
        verify=verify,
    )  # every held-out example
    sizes = dict(input_size=input_size, output_size=output_size)
    stream = ExampleStream(readers, split="eval", eval_fraction=eval_fraction, **({} if align else sizes))
    examples = itertools.islice(stream, max_examples)
    if align is not None:
        examples = (_checked(align(ex), **sizes) for ex in examples)
    return list(Packer(examples, max_tokens=max_tokens, k=cache_k(readers), long_examples=long_examples))


def _checked(ex: Example, *, input_size: int | None, output_size: int | None) -> Example:
    check_ids_fit_student(
        ex, f"held-out example {ex.id!r} aligned to the student", input_size=input_size, output_size=output_size
    )
    return ex
