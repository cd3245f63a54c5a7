"""Codecs v2 (written) and v1 (read): top-k teacher entries <-> compact byte streams. Pure numpy, no I/O.

Per position the teacher gives entries (id, logprob) in rank order. We keep c <= k of them (all k,
or with mass-adaptive truncation the fewest whose probability reaches `mass`), in rank order, and
write separate streams (each its own Parquet column, so zstd sees one kind of data at a time):

* logprobs: the top-1 value as uint16 steps of 1/2048 nat below 0 (`topk_top1`); every entry as
  `q_j = round((top1_hat - logprob_j) * 32)` (1/32 nat: a bf16 teacher's logits have about that
  resolution near -8, so finer steps store noise), kept as rank-order deltas `q_j - q_{j-1}`
  (`topk_step`, one byte each; the first entry's q is 0 and is not stored). Max |error|
  1/64 + 1/4096 < 0.016 nat.
* ids: mapped to codes (a per-shard table of the `hot` most frequent ids gets codes 0..H-1 in
  frequency order, any other id H + id) and split into little-endian byte planes
  (`topk_code_b0`, `topk_code_b1`, and b2, b3 for 4-byte codes): with frequent ids first the high
  planes are nearly constant, which is where most of the compression comes from.
* a step delta >= 255 is written as 255 and its value taken, in order, from `topk_step_escape`
  (uint16; q = 65535 stands for "probability 0").

v1 keeps rank order exactly. v2 (format version 2, issue 24) changes two things, both measured in
docs/BENCHMARKS.md:
* ties: entries whose quantized logprobs are equal (delta 0) are interchangeable, so v2 stores each such
  group (after the top-1, which stays first) in increasing code order, the group's first code as it is
  and every further one as its gap to the previous code (small numbers: zstd packs them). The decoded
  (id, logprob) pairs are the same; only the order inside a group of equal decoded logprobs differs from
  the teacher's.
* the step deltas are split by rank range into `topk_step_1`, `topk_step_2`, `topk_step_4`, ...
  (`STEP_RANGES`: entry index j in [1, 2), [2, 4), [4, 16), ...): each range has its own statistics.
Streams concatenate across positions and rows, so a whole Parquet column decodes in one vectorized
pass. Layout chosen by measurement: see docs/FORMAT.md.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import numpy as np

from formats.errors import FormatError

CODEC_NAMES = {1: "kdcache-topk-v1", 2: "kdcache-topk-v2"}  # codec version -> name (= the format version)
CODEC_VERSION = 2  # what the writer writes
CODEC_NAME = CODEC_NAMES[CODEC_VERSION]
# v2's step streams: entry index j (1-based within a position; entry 0 has no step) in [a, next a) goes to
# `topk_step_{a}`; the last range is open.
STEP_RANGES = (1, 2, 4, 16, 32, 64, 128)
STEPS_PER_NAT = 32
TOP1_STEPS_PER_NAT = 2048
TARGET_STEPS_PER_NAT = 256
ESCAPE = 255
MAX_STEP = 0xFFFF  # a step this large means "at least 2047.97 nat below top-1": probability 0
MAX_K = 65535
MAX_TOKEN_ID = 2**31 - 1  # ids are int32
MAX_TOP1_NAT = 31.99  # uint16 steps of 1/2048; a top-1 below -log(V) is impossible anyway


@dataclass(frozen=True)
class CodecConfig:
    """What a cache keeps of the teacher. Recorded in the manifest.

    k: entries kept per position at most. mass: keep entries (in rank order) only until their
    cumulative probability reaches `mass` (None keeps all k). hot: size of the per-shard table of
    frequent ids that get short codes.
    """

    k: int = 64
    mass: float | None = None
    hot: int = 4096
    version: int = CODEC_VERSION  # 1: read only (caches written before format version 2)

    def __post_init__(self):
        if self.version not in CODEC_NAMES:
            raise ValueError(f"codec version must be one of {sorted(CODEC_NAMES)}, got {self.version!r}")
        if not 1 <= self.k <= MAX_K:
            raise ValueError(f"k must be in 1..{MAX_K}, got {self.k}")
        if self.mass is not None and not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {self.mass}")
        if self.hot < 0:
            raise ValueError(f"hot must be >= 0, got {self.hot}")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"name": CODEC_NAMES[d.pop("version")], **d, **CONSTANTS}

    @classmethod
    def from_dict(cls, d: dict, where: str = "codec") -> "CodecConfig":
        """The codec settings a manifest or shard records; FormatError (naming `where`) when damaged."""
        if not isinstance(d, dict):
            raise FormatError(f"{where}: must be a JSON object, got {type(d).__name__}")
        versions = {name: v for v, name in CODEC_NAMES.items()}
        if not isinstance(d.get("name"), str) or d["name"] not in versions:
            raise FormatError(
                f"{where}: unknown codec {d.get('name')!r:.60} (this kdcache reads {', '.join(versions)}); "
                "upgrade kdcache"
            )
        unknown = sorted(set(d) - set(CODEC_KEYS))
        if unknown:
            raise FormatError(f"{where}: keys this kdcache does not know: {unknown!r:.200}; upgrade kdcache")
        for name, value in CONSTANTS.items():
            if name in d and (type(d[name]) is not float or d[name] != value):
                raise FormatError(
                    f"{where}: {name} is {d[name]!r:.40}, codec {d['name']} is defined with {value}; "
                    "this kdcache cannot decode another step"
                )
        k, mass, hot = d.get("k"), d.get("mass"), d.get("hot", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (k, hot)) or not (
            mass is None or (isinstance(mass, (int, float)) and not isinstance(mass, bool))
        ):
            raise FormatError(f"{where}: k={k!r}, hot={hot!r} must be integers and mass={mass!r} a number or null")
        try:
            return cls(k=k, mass=mass, hot=hot, version=versions[d["name"]])
        except ValueError as exc:
            raise FormatError(f"{where}: {exc}") from None


CONSTANTS = {
    "logprob_step": 1 / STEPS_PER_NAT,
    "top1_step": 1 / TOP1_STEPS_PER_NAT,
    "target_logprob_step": 1 / TARGET_STEPS_PER_NAT,
}
CODEC_KEYS = ("name", "k", "mass", "hot", *CONSTANTS)


# ---- id codes -------------------------------------------------------------------------------


def build_hot_table(ids: np.ndarray, hot: int) -> np.ndarray:
    """The `hot` most frequent ids in `ids` (any shape, -1 = padding), most frequent first. uint32."""
    flat = np.asarray(ids).ravel()
    flat = flat[flat >= 0]
    if hot == 0 or flat.size == 0:
        return np.zeros(0, np.uint32)
    values, counts = np.unique(flat, return_counts=True)
    order = np.lexsort((values, -counts))[:hot]  # ties by id: deterministic
    return values[order].astype(np.uint32)


class IdCodes:
    """id <-> code: hot ids get 0..H-1 (frequency order), every other id gets H + id."""

    def __init__(self, hot_table: np.ndarray):
        self.table = np.asarray(hot_table, np.uint32)
        self.h = len(self.table)
        self._lut = None
        if self.h:
            order = np.argsort(self.table, kind="stable")
            self._sorted = self.table[order].astype(np.int64)
            self._code_of_sorted = order  # table[order[i]] == _sorted[i], and an id's code is its table index

    def encode(self, ids: np.ndarray) -> np.ndarray:
        ids = ids.astype(np.int64)
        codes = ids + self.h
        if self.h:
            pos = np.searchsorted(self._sorted, ids)
            pos = np.minimum(pos, self.h - 1)
            hit = self._sorted[pos] == ids
            codes[hit] = self._code_of_sorted[pos[hit]]
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes -> int32 ids."""
        if not self.h:
            return codes.astype(np.int32)
        if codes.dtype == np.uint16:  # 2-byte codes: one gather from a 64k-entry table
            if self._lut is None:
                self._lut = np.arange(-self.h, (1 << 16) - self.h, dtype=np.int32)
                self._lut[: self.h] = self.table
            return self._lut[codes]
        codes = codes.astype(np.int64)
        hot = codes < self.h
        out = codes - self.h
        out[hot] = self.table[codes[hot]]
        return out.astype(np.int32)


# ---- entries -------------------------------------------------------------------------------


def kept_counts(topk_ids: np.ndarray, topk_logprobs: np.ndarray, cfg: CodecConfig) -> np.ndarray:
    """Entries kept per position: valid ones (id >= 0, finite logprob) up to k, cut at `mass`."""
    k = min(cfg.k, topk_ids.shape[1])
    valid = (topk_ids[:, :k] >= 0) & np.isfinite(topk_logprobs[:, :k])
    # valid entries must come first: count the leading run
    counts = np.where(valid.all(axis=1), k, np.argmin(valid, axis=1))
    if cfg.mass is not None:
        probs = np.where(valid, np.exp(np.where(valid, topk_logprobs[:, :k], -np.inf).astype(np.float64)), 0.0)
        reached = np.cumsum(probs, axis=1) >= cfg.mass - 1e-12
        first = np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, k)
        counts = np.minimum(counts, first)
    return counts.astype(np.int64)


def _frombuffer(buf, dtype, name: str) -> np.ndarray:
    """A stream's bytes as an array; a length that is not a whole number of values is a FormatError."""
    if isinstance(buf, np.ndarray):  # already decoded (a chunk of decode_topk)
        return buf
    size = np.dtype(dtype).itemsize
    if len(buf) % size:
        raise FormatError(f"{name} has {len(buf)} bytes, not a multiple of {size}")
    return np.frombuffer(buf, dtype)


def _escape(values: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    small = np.minimum(values, ESCAPE).astype(np.uint8)
    return small, values[values >= ESCAPE].astype(dtype)


def _unescape(small: np.ndarray, escapes: np.ndarray, what: str) -> np.ndarray:
    out = small.astype(np.uint16)  # deltas and escapes are at most 65535
    where = np.flatnonzero(small == ESCAPE)
    if len(where) != len(escapes):
        raise FormatError(f"{what}: {len(where)} escape markers but {len(escapes)} escape values")
    out[where] = escapes
    return out


def code_bytes(max_code: int) -> int:
    """Bytes per id code: 2 while codes fit uint16 (vocabularies up to ~61k with H=4096), else 4."""
    return 2 if max_code < (1 << 16) else 4


def code_streams(id_bytes: int) -> list[str]:
    """The byte planes of the ids' codes: topk_code_b0, topk_code_b1 (, b2, b3)."""
    return [f"topk_code_b{b}" for b in range(id_bytes)]


def stream_names(version: int, id_bytes: int) -> list[str]:
    """The codec's byte streams (one Parquet binary column each), in column order, for codec `version`."""
    planes = code_streams(id_bytes)
    if version == 1:
        return ["topk_count", "topk_top1", *planes, "topk_step", "topk_step_escape"]
    return ["topk_count", "topk_top1", *planes, *(f"topk_step_{a}" for a in STEP_RANGES), "topk_step_escape"]


def step_ranges(k: int) -> list[tuple[str, int, int]]:
    """(stream, first j, end j) of v2's step streams that can hold entries at this k (j < k)."""
    ends = [*STEP_RANGES[1:], max(k, STEP_RANGES[-1] + 1)]
    return [(f"topk_step_{a}", a, min(b, k)) for a, b in zip(STEP_RANGES, ends) if a < k]


def encode_topk(
    topk_ids: np.ndarray, topk_logprobs: np.ndarray, cfg: CodecConfig, codes: IdCodes, id_bytes: int = 2
) -> dict[str, bytes]:
    """Encode [N, K] rank-ordered entries (padding: id -1 / logprob -inf) into byte streams."""
    topk_ids = np.asarray(topk_ids)
    topk_logprobs = np.asarray(topk_logprobs, np.float32)
    if topk_ids.ndim != 2 or topk_ids.shape != topk_logprobs.shape:
        raise ValueError(f"topk_ids {topk_ids.shape} and topk_logprobs {topk_logprobs.shape} must both be [N, K]")
    n = topk_ids.shape[0]
    k = min(cfg.k, topk_ids.shape[1])
    ids, lps = topk_ids[:, :k].astype(np.int64), topk_logprobs[:, :k].astype(np.float64)
    _refuse_nan(lps, "topk_logprobs")
    counts = kept_counts(ids, lps, cfg)
    if n and counts.min() < 1:
        bad = int(np.argmin(counts))
        raise ValueError(f"position {bad} has no valid top-k entry (ids < 0 or non-finite logprobs)")
    keep = np.arange(k)[None, :] < counts[:, None]
    if n and int(ids[keep].max()) + codes.h >= (1 << (8 * id_bytes)):
        raise ValueError(f"token id {int(ids[keep].max())} does not fit {id_bytes}-byte codes; use id_bytes=4")
    if n and not (lps[:, 0] >= -MAX_TOP1_NAT).all():
        row = int(np.argmin(lps[:, 0]))
        raise ValueError(
            f"position {row}: top-1 logprob {lps[row, 0]} < -{MAX_TOP1_NAT} nat cannot be a distribution's "
            "most likely token (was the input log-softmaxed?)"
        )
    top1 = np.clip(np.round(-lps[:, 0] * TOP1_STEPS_PER_NAT), 0, 0xFFFF) if n else np.zeros(0)
    top1_hat = -top1 / TOP1_STEPS_PER_NAT
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.round((top1_hat[:, None] - lps) * STEPS_PER_NAT)
    q = np.clip(np.nan_to_num(q, nan=MAX_STEP, posinf=MAX_STEP), 0, MAX_STEP).astype(np.int64)
    kept_delta = keep[:, 1:]
    with np.errstate(invalid="ignore"):
        rising = (np.diff(lps, axis=1) > 0) & kept_delta
    if rising.any():
        row = int(np.nonzero(rising)[0][0])
        raise ValueError(f"position {row}: logprobs are not in rank order (they must not increase)")
    delta = np.diff(q, axis=1)
    step8, step_esc = _escape(delta[kept_delta], "<u2")
    head = {"topk_count": counts.astype(count_dtype(cfg)).tobytes(), "topk_top1": top1.astype("<u2").tobytes()}
    if cfg.version == 1:
        return {
            **head,
            **_planes("topk_code_b", codes.encode(ids[keep]), id_bytes),
            "topk_step": step8.tobytes(),
            "topk_step_escape": step_esc.tobytes(),
        }
    # v2: the top-1 first; after it each group of equal q in increasing code order, its first code stored
    # whole and the others as gaps
    code = np.where(keep, codes.encode(ids.reshape(-1)).reshape(ids.shape), 0)
    key = np.where(keep, (q << 33) + code, np.iinfo(np.int64).max)
    key[:, 0] = -1
    code = np.take_along_axis(code, np.argsort(key, axis=1, kind="stable"), axis=1)
    cont = np.zeros_like(keep)
    cont[:, 2:] = kept_delta[:, 1:] & (delta[:, 1:] == 0)
    gap = np.zeros_like(code)
    gap[:, 1:] = code[:, 1:] - code[:, :-1]
    small = np.zeros(delta.shape, np.uint8)
    small[kept_delta] = step8
    steps = {name: small[:, a - 1 : b - 1][kept_delta[:, a - 1 : b - 1]].tobytes() for name, a, b in step_ranges(k)}
    return {
        **head,
        **_planes("topk_code_b", np.where(cont, gap, code)[keep], id_bytes),
        **{f"topk_step_{a}": steps.get(f"topk_step_{a}", b"") for a in STEP_RANGES},
        "topk_step_escape": step_esc.tobytes(),
    }


def _planes(prefix: str, values: np.ndarray, id_bytes: int) -> dict[str, bytes]:
    """Little-endian byte planes of integer `values`: {prefix0: low bytes, prefix1: ...}."""
    return {f"{prefix}{b}": ((values >> (8 * b)) & 0xFF).astype(np.uint8).tobytes() for b in range(id_bytes)}


def tie_canonical(ids: np.ndarray, decoded_lps: np.ndarray) -> np.ndarray:
    """Each row of `ids` with every run of equal `decoded_lps` (a tie) sorted by id. Codec v2 stores a tie in
    its own order (docs/FORMAT.md): two decodes of the same entries, or a decode and the teacher's input,
    compare equal as `tie_canonical(a, a_lps) == tie_canonical(b, a_lps)`, the groups taken from a decode."""
    ids = np.asarray(ids)
    order = np.lexsort((ids, -np.asarray(decoded_lps, np.float64)), axis=-1)
    return np.take_along_axis(ids, order, axis=-1)


def count_dtype(cfg: CodecConfig) -> str:
    return "<u1" if cfg.k <= 255 else "<u2"


DECODE_CHUNK = 1 << 17  # entries decoded at a time: keeps the temporaries in cache (faster at k=128)
# A block decodes to [positions, k]; beyond 2**28 entries it may be at most this many times the entries
# it stores (mass-adaptive rows are short), so a damaged count cannot ask for terabytes.
MAX_DECODE_RATIO = 256


def decode_topk(streams: dict, cfg: CodecConfig, codes: IdCodes, k: int | None = None, *, trim: bool = False):
    """Inverse of encode_topk. Returns (ids int32 [N, k], logprobs float32 [N, k], counts int64 [N]).

    `streams` maps stream names to bytes-like objects. Rows with fewer than k entries are padded
    with id -1 and logprob -inf. With `trim`, k is the most entries any position of the block keeps
    (<= cfg.k): a mass-adaptive block decodes no wider than its widest position.
    """
    k = cfg.k if k is None else k
    counts = _frombuffer(streams["topk_count"], count_dtype(cfg), "topk_count")
    n = len(counts)
    if trim and n:
        widest = int(counts.max())
        if widest > cfg.k:
            raise FormatError(f"topk_count: a position keeps {widest} entries, k is {cfg.k}")
        k = max(1, widest)
    stored = len(streams.get("topk_code_b0") or b"")
    if n * k > max(MAX_DECODE_RATIO * stored, 1 << 28):
        raise FormatError(
            f"topk_count: {n} positions x k={k} entries would be decoded from {stored} stored entries; "
            "refusing to allocate that (a damaged shard, or k does not match the data)"
        )
    if cfg.version == 2:
        streams = _join_step_ranges(streams, counts, k)
    chunk = max(1, DECODE_CHUNK // k)
    if n <= chunk:
        return _decode_block(streams, cfg, codes, k)
    ends = np.cumsum(counts, dtype=np.int64)
    starts = ends - counts
    total = int(ends[-1])
    arrays = {name: np.frombuffer(value, np.uint8) for name, value in streams.items() if value is not None}
    for name, arr in arrays.items():
        if name.startswith("topk_code_b") and len(arr) != total:
            raise FormatError(f"{name} has {len(arr)} bytes, expected {total} (from topk_count)")
    step8, escapes = arrays["topk_step"], _frombuffer(streams["topk_step_escape"], "<u2", "topk_step_escape")
    if len(step8) != total - n:
        raise FormatError(f"topk_step has {len(step8)} deltas, expected {total - n}")
    markers = np.flatnonzero(step8 == ESCAPE)
    if len(markers) != len(escapes):
        raise FormatError(f"topk_step: {len(markers)} escape markers but {len(escapes)} escape values")
    top1 = _frombuffer(streams["topk_top1"], "<u2", "topk_top1")
    out_ids, out_lps = np.empty((n, k), np.int32), np.empty((n, k), np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        e0, e1 = int(starts[a]), int(ends[b - 1])
        d0, d1 = e0 - a, e1 - b
        m0, m1 = np.searchsorted(markers, [d0, d1])
        sub = {name: arr[e0:e1] for name, arr in arrays.items() if name.startswith("topk_code_b")}
        sub.update(topk_count=counts[a:b], topk_top1=top1[a:b], topk_step=step8[d0:d1], topk_step_escape=escapes[m0:m1])
        out_ids[a:b], out_lps[a:b], _ = _decode_block(sub, cfg, codes, k)
    return out_ids, out_lps, counts.astype(np.int64)


def _decode_block(streams: dict, cfg: CodecConfig, codes: IdCodes, k: int):
    counts = _frombuffer(streams["topk_count"], count_dtype(cfg), "topk_count").astype(np.int64)
    top1 = _frombuffer(streams["topk_top1"], "<u2", "topk_top1")
    n = len(counts)
    if len(top1) != n:
        raise FormatError(f"topk_top1 has {len(top1)} values for {n} positions")
    if n == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), counts
    if counts.min() < 1 or counts.max() > k:
        raise FormatError(f"topk_count must be in 1..{k}, found {int(counts.min())}..{int(counts.max())}")
    total = int(counts.sum())
    code = _join_planes(streams, "topk_code_b", total, "topk_count")
    step8 = np.frombuffer(streams["topk_step"], np.uint8)
    escapes = _frombuffer(streams["topk_step_escape"], "<u2", "topk_step_escape")
    if len(escapes):
        delta = _unescape(step8, escapes, "topk_step")
    elif (step8 == ESCAPE).any():
        raise FormatError("topk_step: escape markers but no escape values")
    else:
        delta = step8
    if len(delta) != total - n:
        raise FormatError(f"topk_step has {len(delta)} deltas, expected {total - n}")
    full = total == n * k
    top1_hat = top1.astype(np.float32) * np.float32(-1 / TOP1_STEPS_PER_NAT)
    if cfg.version == 2 and code.dtype == np.uint16 and k < 1 << 15 and sys.byteorder == "little":
        q, code, kept = _steps_and_untie(code, delta, counts, k, full)  # the common v2 case: one pass for both
        ids, lps = codes.decode(code), _logprobs(top1_hat, q)
        if kept is not None:
            ids[~kept], lps[~kept] = -1, -np.inf
        return ids, lps, counts
    if cfg.version == 2:
        code = _untie(code, step8, counts, k, full)
    ids = codes.decode(code)
    if code.dtype != np.uint16 and ids.min() < 0:
        raise FormatError(f"topk_code: a code decodes to token id {int(ids.min())} (< 0)")
    if full:  # every position full: plain reshapes (the common, fast path)
        d = np.empty((n, k), delta.dtype)
        d[:, 0] = 0
        d[:, 1:] = delta.reshape(n, k - 1)
        q = np.cumsum(d.reshape(-1), dtype=np.int32).reshape(n, k)
        _subtract_row_base(q)
        return ids.reshape(n, k), _logprobs(top1_hat, q), counts
    q = np.zeros((n, k), np.int32)
    mask = np.arange(k)[None, :] < counts[:, None]
    inner = mask.copy()
    inner[:, 0] = False
    q[inner] = delta
    _rowwise_cumsum(q)
    lps = _logprobs(top1_hat, q)
    out_ids = np.full((n, k), -1, np.int32)
    out_ids[mask] = ids
    lps[~mask] = -np.inf
    return out_ids, lps, counts


def _join_planes(streams: dict, prefix: str, size: int, whence: str) -> np.ndarray:
    """The integers whose little-endian byte planes are streams prefix0, prefix1, ...: uint16 for two planes
    (decoding is memory-bound: narrow types throughout), else int64. Each plane must hold `size` bytes."""
    planes = []
    while streams.get(f"{prefix}{len(planes)}") is not None:
        plane = np.frombuffer(streams[f"{prefix}{len(planes)}"], np.uint8)
        if len(plane) != size:
            raise FormatError(f"{prefix}{len(planes)} has {len(plane)} bytes, expected {size} (from {whence})")
        planes.append(plane)
    if not planes:
        raise FormatError(f"{prefix}0 is missing")
    if len(planes) == 2:
        out = planes[0].astype(np.uint16)
        out |= planes[1].astype(np.uint16) << np.uint16(8)
        return out
    out = np.zeros(size, np.int64)
    for b, plane in enumerate(planes):
        out |= plane.astype(np.int64) << (8 * b)
    return out


def _join_step_ranges(streams: dict, counts: np.ndarray, k: int) -> dict:
    """v2's streams with the step ranges joined into v1's one `topk_step` (entry order: position by position)."""
    n = len(counts)
    if n and (counts.min() < 1 or counts.max() > k):
        raise FormatError(f"topk_count must be in 1..{k}, found {int(counts.min())}..{int(counts.max())}")
    full = int(counts.sum(dtype=np.int64)) == n * k
    inner = None if full else np.arange(1, k)[None, :] < counts[:, None]  # [n, k-1]: entry j >= 1 is kept
    small = np.zeros((n, k - 1), np.uint8)
    for name, a, b in step_ranges(k):
        values = np.frombuffer(streams.get(name) or b"", np.uint8)
        want = n * (b - a) if full else int(inner[:, a - 1 : b - 1].sum())
        if len(values) != want:
            raise FormatError(f"{name} has {len(values)} deltas, expected {want} (from topk_count)")
        if full:
            small[:, a - 1 : b - 1] = values.reshape(n, b - a)
        else:
            small[:, a - 1 : b - 1][inner[:, a - 1 : b - 1]] = values
    for a in STEP_RANGES:
        if a >= k and len(streams.get(f"topk_step_{a}") or b""):
            raise FormatError(f"topk_step_{a} holds deltas, but no entry has index >= {a} at k={k}")
    planes = {name: value for name, value in streams.items() if name.startswith("topk_code_b")}
    return {
        "topk_count": streams["topk_count"],
        "topk_top1": streams["topk_top1"],
        **planes,
        "topk_step": small.reshape(-1) if full else small[inner],
        "topk_step_escape": streams["topk_step_escape"],
    }


def _untie(stored: np.ndarray, step8: np.ndarray, counts: np.ndarray, k: int, full: bool) -> np.ndarray:
    """v2's codes from the stored values: inside a tie (an entry whose delta is 0) a value is the gap to the
    previous entry's code, so a code is its group's first value plus the gaps up to it: a running sum per
    position, restarted at every entry that is not a tie. Row by row in [n, k] (one decode block: in cache)."""
    n, width = len(counts), (2 if stored.dtype == np.uint16 else 4)
    acc = np.int32 if width == 2 and k < 1 << 15 else np.int64  # a position's sum of 2-byte values fits int32
    if full:
        value, tie = stored.reshape(n, k), np.zeros((n, k), bool)
        tie[:, 1:] = step8.reshape(n, k - 1) == 0
    else:
        kept = np.arange(k)[None, :] < counts[:, None]
        inner = kept.copy()
        inner[:, 0] = False
        value, tie = np.zeros((n, k), stored.dtype), np.zeros((n, k), bool)
        value[kept] = stored
        tie[inner] = step8 == 0
    tie[:, 1:2] = False  # the top-1 (entry 0) is never in a group: entry 1 starts one
    running = np.cumsum(value, axis=1, dtype=acc)
    before = np.empty_like(running)  # the sum before each entry; kept at group starts, carried over the group
    before[:, 0] = 0
    before[:, 1:] = running[:, :-1]
    np.copyto(before, 0, where=tie)
    np.maximum.accumulate(before, axis=1, out=before)  # running sums never decrease: the last start's wins
    running -= before
    if running.max(initial=0) >= 1 << (8 * width):
        raise FormatError(f"topk_code: a tie group's gaps add up beyond the largest {width}-byte code")
    out = running.astype(stored.dtype)
    return out.reshape(-1) if full else out[kept]


def _steps_and_untie(stored: np.ndarray, delta: np.ndarray, counts: np.ndarray, k: int, full: bool):
    """`_untie` and the steps' running sum q of a block with 2-byte codes, in one cumsum: each entry packs
    (delta << 32) | stored value into an int64, and a row's sums stay below 2^31 in both halves (k < 2^15
    values < 2^16), so no carry crosses. Returns q [n, k] int32, the codes [n, k] uint16 and the kept entries
    [n, k] (None when every position is full; past a position's count q repeats and the codes are junk)."""
    n = len(counts)
    packed = np.zeros((n, k), np.int64)
    if full:
        kept = None
        packed[:, 1:] = delta.reshape(n, k - 1)
        packed <<= 32
        packed |= stored.reshape(n, k)
    else:
        kept = np.arange(k)[None, :] < counts[:, None]
        inner = kept.copy()
        inner[:, 0] = False
        packed[inner] = delta
        packed <<= 32
        low = np.zeros((n, k), np.uint16)
        low[kept] = stored
        packed |= low
    starts = packed[:, 1:] >= 1 << 32  # delta > 0: an entry that starts a group (padding has delta 0) ...
    starts[:, :1] = True  # ... and entry 1: the top-1 is never in a group
    np.cumsum(packed, axis=1, out=packed)
    halves = packed.view(np.int32).reshape(n, k, 2)  # little-endian: [..., 0] the low half
    running, q = halves[..., 0], halves[..., 1]
    before = np.empty((n, k), np.int32)  # the sum before each entry at group starts, 0 inside a tie
    before[:, 0] = 0
    np.multiply(running[:, :-1], starts, out=before[:, 1:])
    np.maximum.accumulate(before, axis=1, out=before)  # carried over the group: running sums never decrease
    code = np.subtract(running, before)
    if code.max(initial=0) >= 1 << 16:  # (padding repeats its position's last code: no larger)
        raise FormatError("topk_code: a tie group's gaps add up beyond the largest 2-byte code")
    return q, code.astype(np.uint16), kept


def _logprobs(top1_hat: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Logprobs from steps below the top-1; q >= MAX_STEP is "probability 0", i.e. -inf."""
    lps = np.multiply(q, np.float32(-1 / STEPS_PER_NAT), dtype=np.float32)
    lps += top1_hat[:, None]
    if len(q) and q[:, -1].max() >= MAX_STEP:  # q never decreases along a row: the last column tells
        lps[q >= MAX_STEP] = -np.inf
    return lps


def _rowwise_cumsum(q: np.ndarray) -> None:
    """In-place cumulative sum along axis 1 of a C-contiguous [N, K] int array.

    numpy's cumsum(axis=1) walks the array with a stride and is ~20x slower than a flat cumsum;
    subtracting each row's running base from one flat cumsum gives the same result.
    """
    flat = q.reshape(-1)
    np.cumsum(flat, out=flat)
    _subtract_row_base(q)


def _subtract_row_base(q: np.ndarray) -> None:
    """Turn a flat running sum over [N, K] into per-row running sums."""
    n, k = q.shape
    flat = q.reshape(-1)
    base = np.zeros(n, flat.dtype)
    base[1:] = flat[k - 1 : -1 : k]
    q -= base[:, None]


# ---- the actual token's logprob and rank ---------------------------------------------------


def encode_target(logprobs: np.ndarray, ranks: np.ndarray) -> dict[str, bytes]:
    """The actual token's logprob (steps of 1/256 nat, clamped at -255.996) and 1-based rank."""
    logprobs = np.asarray(logprobs, np.float64)
    _refuse_nan(logprobs, "target_logprobs")
    q = np.round(-np.maximum(logprobs, -1e9) * TARGET_STEPS_PER_NAT)
    q = np.clip(q, 0, 0xFFFF).astype("<u2")
    return {"target_logprob": q.tobytes(), "target_rank": np.asarray(ranks).astype("<u4").tobytes()}


def _refuse_nan(values: np.ndarray, name: str) -> None:
    """NaN is not a logprob; encoding it would write a number (a wrong one)."""
    bad = np.isnan(values)
    if bad.any():
        row = int(np.nonzero(bad)[0][0])
        raise ValueError(
            f"position {row}: {name} holds NaN (a teacher overflow or a bug upstream); a NaN cannot be stored"
        )


def decode_target(streams: dict[str, bytes]):
    q = _frombuffer(streams["target_logprob"], "<u2", "target_logprob")
    ranks = _frombuffer(streams["target_rank"], "<u4", "target_rank").astype(np.int32)
    if len(q) != len(ranks):
        raise FormatError(f"target_logprob has {len(q)} values, target_rank {len(ranks)}")
    return -q.astype(np.float32) / TARGET_STEPS_PER_NAT, ranks
