"""CacheReader: stream a cache (local or fsspec URL) as decoded Examples, never loading it whole.

    reader = CacheReader("s3://bucket/cache", rank=rank, world_size=world, shuffle=True, seed=0)
    for example in reader:           # formats.Example, numpy arrays
        ...
    state = reader.state_dict()       # save with the checkpoint; load_state_dict() resumes exactly

The unit of reading is a Parquet row group (a shard holds many). An epoch's order lists every
example once: the row groups of all shards (permuted with the seed and the epoch when shuffling),
each row group's rows in turn (permuted with the seed, the epoch and the row group). Partitioning
balances examples, not row groups: with N examples on W ranks, rank r reads positions
[r*n, (r+1)*n) of that order, n = N // W. So every rank reads the same number of examples (DDP
needs equal step counts), each example goes to at most one rank, a rank decodes a contiguous
stretch of row groups (those at a boundary between two ranks are decoded by both), and the last
N mod W < W examples of each epoch's order are read by no rank; rank 0 logs a warning with
their count. With drop_remainder=False (evaluation, where every example counts and ranks may run
uneven) the first N mod W ranks read one example more and none is left over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from formats.example import Example
from formats.manifest import load_manifest, open_cache, row_limits
from formats.common.prefetch import prefetch
from formats.shard import ShardFile

log = logging.getLogger("formats")
STATE_VERSION = 2  # 2: balanced by examples, cursor = (epoch, position in this rank's slice)


@dataclass(frozen=True)
class Unit:
    shard: int  # index into manifest["shards"]
    row_group: int
    rows: int  # rows read from the row group (a prefix, when max_examples cuts it)


class CacheReader:
    def __init__(
        self,
        path,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        epochs: int | None = 1,
        max_examples: int | None = None,
        prefetch: int = 2,
        drop_remainder: bool = True,
        storage_options: dict | None = None,
        verify: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        self.path = str(path)
        self.files = open_cache(path, storage_options)  # every file is read through formats.trust
        self.manifest = load_manifest(self.files)
        self.verify = verify
        self._limits = row_limits(self.manifest)
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.epochs = shuffle, seed, epochs
        self.prefetch = prefetch
        self._files: dict[int, ShardFile] = {}
        self.units = self._list_units(max_examples)
        self.total = sum(u.rows for u in self.units)  # examples per epoch, all ranks
        base, extra = divmod(self.total, world_size)
        if drop_remainder:  # equal counts (training: DDP needs equal steps); `extra` left over
            self.lo, self.per_rank, self.leftover = rank * base, base, extra
        else:  # every example (evaluation): the first `extra` ranks read one more
            self.lo, self.per_rank, self.leftover = rank * base + min(rank, extra), base + (rank < extra), 0
        self._epoch, self._pos = 0, 0  # cursor: examples of this epoch read
        if self.leftover and rank == 0:
            log.warning(
                "%s: %d of %d examples per epoch are left over (read by no rank): %d ranks read %d each; "
                "the last %d of each epoch's order are skipped (a different set each epoch when shuffling)",
                self.path,
                self.leftover,
                self.total,
                world_size,
                self.per_rank,
                self.leftover,
            )

    # ---- layout -----------------------------------------------------------------------------
    def _shard(self, i: int) -> ShardFile:
        if i not in self._files:
            self._files[i] = ShardFile(self.files, self.manifest, i, verify=self.verify, limits=self._limits)
        return self._files[i]

    def _list_units(self, max_examples: int | None) -> list[Unit]:
        units, total = [], 0
        for i, shard in enumerate(self.manifest["shards"]):
            shard = self._shard(i)
            for g in range(shard.num_row_groups):
                rows = shard.rows(g)
                if max_examples is not None:
                    rows = min(rows, max_examples - total)
                    if rows <= 0:
                        return units
                units.append(Unit(i, g, rows))
                total += rows
        return units

    def _plan(self, epoch: int) -> list[tuple[Unit, np.ndarray]]:
        """This rank's (unit, rows) list for an epoch: positions [lo, lo + per_rank) of the epoch's order."""
        order = range(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        lo, hi = self.lo, self.lo + self.per_rank
        plan, start = [], 0
        for u in order:
            unit = self.units[u]
            end = start + unit.rows
            if start < hi and end > lo:
                rows = np.arange(unit.rows)
                if self.shuffle:
                    rows = np.random.default_rng([self.seed, epoch, unit.shard, unit.row_group]).permutation(unit.rows)
                plan.append((unit, rows[max(lo - start, 0) : min(hi, end) - start]))
            start = end
            if start >= hi:
                break
        return plan

    def example_ids(self) -> list[str]:
        """Every example id of the epoch (all ranks), reading only the id column."""
        ids = []
        for unit in self.units:
            ids += self._shard(unit.shard).read(unit.row_group, columns=["id"]).column("id").to_pylist()[: unit.rows]
        return ids

    def num_examples(self) -> int:
        """Examples this rank reads per epoch (the same on every rank unless drop_remainder=False)."""
        return self.per_rank

    def load_unit(self, unit: Unit) -> list[Example]:
        return self._shard(unit.shard).examples(unit.row_group, unit.rows)

    # ---- iteration --------------------------------------------------------------------------
    def __iter__(self):
        while self.epochs is None or self._epoch < self.epochs:
            plan = self._plan(self._epoch)
            first, skip = self._locate(plan, self._pos)
            for unit_pos, examples in self._prefetched(plan, first):
                for row in plan[unit_pos][1][skip:]:
                    self._pos += 1
                    yield examples[row]
                skip = 0
            self._epoch, self._pos = self._epoch + 1, 0
            if not plan and self.epochs is None:
                return  # nothing for this rank: an endless loop would spin

    @staticmethod
    def _locate(plan, pos: int) -> tuple[int, int]:
        """(unit index in `plan`, row offset in it) of this rank's `pos`-th example of the epoch."""
        for i, (_, rows) in enumerate(plan):
            if pos < len(rows):
                return i, pos
            pos -= len(rows)
        return len(plan), 0

    def _prefetched(self, plan, start: int):
        """Yield (unit_pos, decoded examples) from `start`, decoding up to `prefetch` units ahead."""
        units = ((pos, self.load_unit(plan[pos][0])) for pos in range(start, len(plan)))
        yield from prefetch(units, self.prefetch) if self.prefetch > 0 else units

    def batches(self, batch_size: int, as_torch: bool = False):
        """Padded batches of `batch_size` examples (formats.batch.pad_batch); the last may be smaller.

        The cursor (state_dict) advances per example, so a checkpoint taken between batches resumes
        at the next batch.
        """
        from formats.batch import pad_batch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pending = []
        for ex in self:
            pending.append(ex)
            if len(pending) == batch_size:
                yield pad_batch(pending, as_torch)
                pending = []
        if pending:
            yield pad_batch(pending, as_torch)

    # ---- cursor -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "position": self._pos,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "rank": self.rank,
            "world_size": self.world_size,
            "units": len(self.units),
            "examples": self.total,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"reader state of version {state.get('version')!r} (an older kdcache, which split the "
                f"data over ranks differently); this reader needs version {STATE_VERSION}: "
                "start the run over (a new --out)"
            )
        for key in ("seed", "shuffle", "rank", "world_size", "units", "examples"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(
                    f"reader state was saved with {key}={state.get(key)!r}, this reader has {mine!r}; "
                    "resume with the same cache and settings"
                )
        if not 0 <= state["position"] <= self.per_rank:
            raise ValueError(
                f"reader state position {state['position']} is outside this rank's {self.per_rank} examples per epoch"
            )
        self._epoch, self._pos = state["epoch"], state["position"]
