"""CacheReader: stream a cache (local or fsspec URL) as decoded Examples, never loading it whole.

    reader = CacheReader("s3://bucket/cache", rank=rank, world_size=world, shuffle=True, seed=0)
    for example in reader:           # formats.Example, numpy arrays
        ...
    state = reader.state_dict()       # save with the checkpoint; load_state_dict() resumes exactly

The unit of work is a Parquet row group (a shard holds many). Shuffling permutes the row groups of
all shards with the seed and the epoch, then the rows inside each row group; partitioning gives
rank r every world_size-th row group of that order (or, when there are fewer row groups than
ranks, every world_size-th row of each). Either way each row goes to exactly one rank.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from formats.errors import FormatError
from formats.example import Example
from formats.manifest import load_manifest, open_cache
from formats.prefetch import prefetch
from formats.schema import read_shard_metadata
from formats.shard import decode_table


@dataclass(frozen=True)
class Unit:
    shard: int      # index into manifest["shards"]
    row_group: int
    rows: int       # rows read from the row group (a prefix, when max_examples cuts it)


class CacheReader:
    def __init__(self, path, *, rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0,
                 epochs: int | None = 1, max_examples: int | None = None, prefetch: int = 2,
                 storage_options: dict | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        self.path = str(path)
        self.fs, self.root = open_cache(path, storage_options)
        self.manifest = load_manifest(path, storage_options)
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.epochs = shuffle, seed, epochs
        self.prefetch = prefetch
        self._files: dict[int, tuple] = {}
        self.units = self._list_units(max_examples)
        self._epoch, self._unit_pos, self._row_pos = 0, 0, 0

    # ---- layout -----------------------------------------------------------------------------
    def _shard(self, i: int):
        if i not in self._files:
            name = self.manifest["shards"][i]["file"]
            where = posixpath.join(self.root, name)
            if not self.fs.exists(where):
                raise FormatError(f"{self.path}: shard {name} listed in the manifest is missing; "
                                  "restore it (or re-run the job that wrote it)")
            try:
                pf = pq.ParquetFile(self.fs.open(where, "rb"))
            except Exception as exc:  # pyarrow raises several types for damaged files
                raise FormatError(f"{where}: not a readable Parquet file ({exc}); run `kdcache verify` on the cache") from None
            self._files[i] = (pf, read_shard_metadata(pf.schema_arrow, where), where)
        return self._files[i]

    def _list_units(self, max_examples: int | None) -> list[Unit]:
        units, total = [], 0
        for i, shard in enumerate(self.manifest["shards"]):
            pf, _, _ = self._shard(i)
            for g in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(g).num_rows
                if max_examples is not None:
                    rows = min(rows, max_examples - total)
                    if rows <= 0:
                        return units
                units.append(Unit(i, g, rows))
                total += rows
        return units

    def _plan(self, epoch: int) -> list[tuple[Unit, np.ndarray]]:
        """This rank's (unit, row order) list for an epoch."""
        order = list(range(len(self.units)))
        if self.shuffle:
            order = list(np.random.default_rng([self.seed, epoch]).permutation(len(self.units)))
        plan = []
        by_unit = len(self.units) >= self.world_size
        for pos, u in enumerate(order):
            if by_unit and pos % self.world_size != self.rank:
                continue
            unit = self.units[u]
            rows = np.arange(unit.rows)
            if self.shuffle:
                rows = np.random.default_rng([self.seed, epoch, unit.shard, unit.row_group]).permutation(unit.rows)
            if not by_unit:
                rows = rows[(np.arange(len(rows)) % self.world_size) == self.rank]
            plan.append((unit, rows))
        return plan

    def num_examples(self) -> int:
        """Examples this rank reads per epoch."""
        return sum(len(rows) for _, rows in self._plan(0))

    def load_unit(self, unit: Unit) -> list[Example]:
        pf, meta, where = self._shard(unit.shard)
        try:
            table = pf.read_row_group(unit.row_group)
        except Exception as exc:
            raise FormatError(f"{where}, row group {unit.row_group}: cannot be read ({exc}); run `kdcache verify`") from None
        if unit.rows < table.num_rows:
            table = table.slice(0, unit.rows)
        return decode_table(table, meta, f"{where}, row group {unit.row_group}")

    # ---- iteration --------------------------------------------------------------------------
    def __iter__(self):
        while self.epochs is None or self._epoch < self.epochs:
            plan = self._plan(self._epoch)
            for unit_pos, examples in self._prefetched(plan, self._unit_pos):
                rows = plan[unit_pos][1]
                while self._row_pos < len(rows):
                    ex = examples[rows[self._row_pos]]
                    self._row_pos += 1
                    yield ex
                self._unit_pos, self._row_pos = unit_pos + 1, 0
            self._epoch, self._unit_pos, self._row_pos = self._epoch + 1, 0, 0
            if not plan and self.epochs is None:
                return  # nothing for this rank: an endless loop would spin

    def _prefetched(self, plan, start: int):
        """Yield (unit_pos, decoded examples) from `start`, decoding up to `prefetch` units ahead."""
        units = ((pos, self.load_unit(plan[pos][0])) for pos in range(start, len(plan)))
        yield from prefetch(units, self.prefetch) if self.prefetch > 0 else units

    def batches(self, batch_size: int, as_torch: bool = False):
        """Padded batches of `batch_size` examples (formats.batch.collate); the last may be smaller.

        The cursor (state_dict) advances per example, so a checkpoint taken between batches resumes
        at the next batch.
        """
        from formats.batch import collate

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pending = []
        for ex in self:
            pending.append(ex)
            if len(pending) == batch_size:
                yield collate(pending, as_torch)
                pending = []
        if pending:
            yield collate(pending, as_torch)

    # ---- cursor -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "unit": self._unit_pos, "row": self._row_pos, "seed": self.seed,
                "shuffle": self.shuffle, "rank": self.rank, "world_size": self.world_size, "units": len(self.units)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "shuffle", "rank", "world_size", "units"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"reader state was saved with {key}={state.get(key)!r}, this reader has {mine!r}; "
                                 "resume with the same cache and settings")
        self._epoch, self._unit_pos, self._row_pos = state["epoch"], state["unit"], state["row"]
