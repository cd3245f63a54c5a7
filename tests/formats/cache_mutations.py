"""The mutation fuzzer of issue 19 ("a received cache is untrusted"): base caches, mutation operators,
the oracle, and the worker that runs cases in isolation (tests/formats/test_fuzz_cache.py drives it).

A case is (seed, index), or a named regression case (REGRESSION). `random.Random(f"{seed}:{index}")`
picks a base cache, one mutation and its parameters; the mutation is applied to a fresh copy of the
base cache, then every reader operation (OPS) runs on the mutated copy, each on its own. A case
passes when each operation either

- raises a typed error (formats.errors.KDCacheError) whose message names the offending file (its
  name) or the cache's path and holds no raw control character, or
- returns exactly the original data: the same multiset of examples (id, source, input_ids,
  target_positions, topk_ids, topk_logprobs, target_logprobs, target_ranks, finish_reason, meta),
  the same rejects, the same tokenizer; `verify` passing counts only when the data read back after
  it is the original's; `summarize` must print no control character but newline;

within TIME_BOUND seconds (the parent kills a worker that takes longer: a hang) and MEM_BOUND_MB of
memory above the worker's baseline (RLIMIT_AS turns a bomb into a MemoryError, also a failure).
A mutation that rewrites a shard or the rejects file and fixes up its sha256 at random ("lie_ok")
may legitimately decode to other data (a consistent lie, docs/FORMAT.md "Threat model"): there the
data must instead satisfy every documented invariant (`invariant_problems`), else it is a failure.

Reproduce one case in this process (tracebacks shown; builds the base caches first, ~5 s):

    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.formats.cache_mutations 0:17 [--op read] [--keep /tmp/case]
    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.formats.cache_mutations fifo-shard
    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.formats.cache_mutations --summary 500:0   # table, via workers
"""

from __future__ import annotations

import base64
import collections
import json
import os
import posixpath
import random
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
# seconds per operation: a hang is unbounded work, so the bound is far above the slowest operation on an idle
# machine (about 1 s); at 20 s a merge of a million-key manifest (9 s idle) was called a hang on a loaded CI machine
TIME_BOUND = float(os.environ.get("FUZZ_TIMEOUT", "60"))
MEM_BOUND_MB = int(os.environ.get("FUZZ_MEM_MB", "1536"))  # above the worker's baseline
MAX_SHOWN = 300  # characters of a message kept in a report

OPS = ("verify", "verify_checksums", "read", "merge", "summarize", "tokenizer")
BASES = ("plain", "gen", "tok")  # fuzzed; "donor" and "gendonor" only lend shards
BASE_WEIGHTS = (0.45, 0.30, 0.25)
FIXED_CREATED = "2026-01-01T00:00:00Z"  # no clock in the bytes: a case mutates the same bytes every run


def ops_for(base: str) -> list[str]:
    return [op for op in OPS if op != "tokenizer" or base == "tok"]


# ==== base caches ==================================================================================

MESSAGES = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]
TEMPLATE = {"max_length": 40, "length_policy": "truncate", "end_of_turn_ids": [2], "messages_in_meta": True}
GEN_TEMPLATE = {**TEMPLATE, "max_length": 30}
SAMPLING = {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 10, "seed": 0}


def _examples(rng, n, prefix, mode, min_len=6):
    from .format_helpers import make_example

    out = []
    for i in range(n):
        ex = make_example(rng, i, prefix=prefix, min_len=min_len, max_len=40)
        ex.source = ("tulu", "flan", "oasst")[i % 3]
        if mode == "score":
            ex.meta = {"messages": MESSAGES, "truncated": False}
        else:
            ex.finish_reason = "stop" if i % 3 else "length"
            ex.meta = {"messages": MESSAGES, "prompt_turns": 1, "prompt_tokens": 3, "sample": 0}
        out.append(ex)
    return out


def _write(path, examples, rejects, provenance, codec):
    from formats import CacheWriter

    from .format_helpers import edit_manifest

    with CacheWriter(
        path, codec=codec, provenance=provenance, output_size=1000, row_group_positions=64, shard_max_bytes=4000
    ) as w:
        for ex in examples:
            w.write(ex)
        for rid, reason in rejects:
            w.reject(rid, reason, source="tulu")
        w.inputs = len(examples) + len(rejects)
    edit_manifest(path, lambda m: m.update(created=FIXED_CREATED))


def build_caches(root) -> dict[str, str]:
    """The base caches under `root`: plain (score, k=8, 3 shards of 2 row groups, rejects), gen
    (generate mode, mass-adaptive CodecConfig(k=8, mass=0.9)), tok (with tokenizer files), and the
    shard donors donor (plain's codec) and gendonor (gen's). Deterministic bytes."""
    from formats import CodecConfig
    from formats.tokenizer_files import add_tokenizer
    from formats.tokenizer_id import tokenizer_info

    from ..tokenizer_helpers import tiny_tokenizer
    from .format_helpers import PROVENANCE

    root = Path(root)
    rng = np.random.default_rng(20261130)
    score = {**PROVENANCE, "command": "kdcache cache (fuzz base)", "template": TEMPLATE}
    gen = {**score, "mode": "generate", "template": GEN_TEMPLATE, "sampling": SAMPLING}
    plain_codec, gen_codec = CodecConfig(k=8), CodecConfig(k=8, mass=0.9)
    rejects = [("r1", "too_long: 4100 tokens"), ("r2", "no assistant turn"), ("r3", "bad json: line 7")]
    _write(root / "plain", _examples(rng, 30, "ex", "score"), rejects, score, plain_codec)
    _write(root / "gen", _examples(rng, 24, "g", "generate"), rejects[:2], gen, gen_codec)
    _write(
        root / "donor",
        _examples(rng, 22, "dn", "score", min_len=12),
        [("dr1", "too_long: 5000 tokens")],
        score,
        plain_codec,
    )
    _write(root / "gendonor", _examples(rng, 20, "gd", "generate", min_len=12), [], gen, gen_codec)
    tok = tiny_tokenizer()
    tok_dir = root / "tokenizer-src"
    tok.save_pretrained(tok_dir)
    _write(
        root / "tok",
        _examples(rng, 12, "t", "score"),
        rejects[1:2],
        {**score, "tokenizer": tokenizer_info(tok, "tiny")},
        plain_codec,
    )
    add_tokenizer(root / "tok", str(tok_dir))
    from .format_helpers import edit_manifest

    edit_manifest(root / "tok", lambda m: m.update(created=FIXED_CREATED))
    return {name: str(root / name) for name in ("plain", "gen", "tok", "donor", "gendonor")}


# ==== the mutation context =========================================================================


class Raw:
    """JSON text written as it is (a 5,000-digit number, NaN, 100k-deep nesting, duplicate keys)."""

    def __init__(self, text: str, label: str | None = None):
        self.text, self.label = text, label

    def __repr__(self):
        return self.label or (
            self.text if len(self.text) < 40 else f"<raw {len(self.text)} chars: {self.text[:20]}...>"
        )


def dump(obj) -> str:
    """json.dumps, with every Raw written verbatim."""
    raws: list[str] = []

    def strip(o):
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items()}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o

    text = json.dumps(strip(obj))
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw, 1)
    return text


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """A message as plain text, control characters escaped, cut to `limit` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[: limit - 12] + f"...<{len(text)}>"


def show(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 12] + f"...<{len(text)}>"


class Ctx:
    """One case's mutation: the case's copy of a base cache, its rng, the parameters chosen (forced
    ones come from a regression case), the files it touched, and whether a consistent lie may result."""

    def __init__(self, base: str, cache: Path, bases: dict, rng: random.Random, forced: dict | None = None):
        self.base, self.cache, self.case_dir, self.bases = base, Path(cache), Path(cache).parent, bases
        self.rng, self.forced = rng, dict(forced or {})
        self.params: dict = {}
        self.names: set[str] = set()  # names of the offending files (an error must name one, or the cache)
        self.lie_ok = False

    def pick(self, key, choices, weights=None):
        if key in self.forced:
            value = self.forced[key]
        else:
            choices = list(choices)
            value = self.rng.choices(choices, weights)[0] if weights else self.rng.choice(choices)
        self.params[key] = value
        return value

    def randint(self, key, lo, hi):
        value = self.forced[key] if key in self.forced else self.rng.randint(lo, hi)
        self.params[key] = value
        return value

    def touch(self, rel: str):
        self.names.add(posixpath.basename(str(rel)) or str(rel))

    # -- the cache's files ---------------------------------------------------------------------
    def manifest(self) -> dict:
        return json.loads((self.cache / "manifest.json").read_text())

    def save_manifest(self, m, text: str | bytes | None = None):
        raw = text if text is not None else dump(m)
        (self.cache / "manifest.json").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
        self.touch("manifest.json")

    def shard_index(self) -> int:
        return self.randint("shard", 0, len(self.manifest()["shards"]) - 1)

    def shard_path(self, i: int) -> Path:
        return self.cache / self.manifest()["shards"][i]["file"]

    def files(self) -> dict[str, list[str]]:
        """The cache's files by role (paths relative to the cache)."""
        m = self.manifest()
        out = {
            "shard": [s["file"] for s in m["shards"]],
            "manifest": ["manifest.json"],
            "rejects": [],
            "card": ["README.md"],
            "tokenizer": [f"tokenizer/{e['file']}" for e in m.get("tokenizer_files") or []],
        }
        if m.get("rejects_file"):
            out["rejects"] = [m["rejects_file"]["file"]]
        return out

    def target_file(
        self, roles=("shard", "manifest", "rejects", "tokenizer", "card"), weights=(6, 3, 2, 2, 0.5)
    ) -> str:
        files = self.files()
        avail = [(r, w) for r, w in zip(roles, weights) if files.get(r)]
        role = self.pick("role", [r for r, _ in avail], [w for _, w in avail])
        rel = self.pick("file", files[role])
        self.touch(rel)
        return rel

    def donors(self, exclude: str | None = None) -> list[tuple[str, dict]]:
        """(path, manifest entry) of every shard of every cache, but `exclude` (a path)."""
        out = []
        for name in ("plain", "gen", "tok", "donor", "gendonor"):
            m = json.loads((Path(self.bases[name]) / "manifest.json").read_text())
            for e in m["shards"]:
                path = str(Path(self.bases[name]) / e["file"])
                if path != exclude:
                    out.append((path, e))
        return out

    def compatible_donor(self, rows: int) -> tuple[str, dict]:
        """A shard of another cache with this cache's codec and mode, whose row count is not `rows`."""
        name = "gendonor" if self.base == "gen" else "donor"
        m = json.loads((Path(self.bases[name]) / "manifest.json").read_text())
        entries = [e for e in m["shards"] if e["rows"] != rows] or m["shards"]
        e = entries[self.randint("donor_shard", 0, len(entries) - 1)]
        return str(Path(self.bases[name]) / e["file"]), dict(e)


def sha256_file(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def fix_file_entry(ctx: Ctx, rel: str) -> None:
    """Make the manifest vouch for `rel` as it is now (size and sha256; counts.bytes for a shard)."""
    m = ctx.manifest()
    path = ctx.cache / rel
    size, digest = path.stat().st_size, sha256_file(path)
    for e in m["shards"]:
        if e["file"] == rel:
            m["counts"]["bytes"] += size - e["bytes"]
            e.update(bytes=size, sha256=digest)
    if m.get("rejects_file") and m["rejects_file"]["file"] == rel:
        m["rejects_file"]["sha256"] = digest
    for e in m.get("tokenizer_files") or []:
        if f"tokenizer/{e['file']}" == rel:
            e.update(bytes=size, sha256=digest)
    ctx.save_manifest(m)


def adopt_shard(m: dict, i: int, entry: dict, path) -> None:
    """Make shard entry i describe the shard file at `path` (whose own entry was `entry`): rows,
    positions, bytes, sha256 and the counts, so only the check under test can refuse it."""
    e, c = m["shards"][i], m["counts"]
    size = os.path.getsize(path)
    c["examples"] += entry["rows"] - e["rows"]
    c["positions"] += entry["positions"] - e["positions"]
    c["bytes"] += size - e["bytes"]
    if "inputs" in c:
        c["inputs"] += entry["rows"] - e["rows"]
    e.update(rows=entry["rows"], positions=entry["positions"], bytes=size, sha256=sha256_file(path))


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# ==== mutation operators ===========================================================================
# Each takes the Ctx and mutates ctx.cache in place; what it chose is in ctx.params.


def m_flip(ctx: Ctx):
    """Bytes of a file flipped at random offsets (optionally the manifest then vouches for the new bytes)."""
    rel = ctx.target_file()
    path = ctx.cache / rel
    data = bytearray(path.read_bytes())
    n = ctx.randint("flips", 1, 8)
    offsets = [ctx.rng.randrange(len(data)) for _ in range(n)] if data else []
    for off in offsets:
        data[off] ^= ctx.rng.randint(1, 255)
    ctx.params["offsets"] = offsets
    path.write_bytes(bytes(data))
    _maybe_fixup(ctx, rel)


def m_truncate(ctx: Ctx):
    rel = ctx.target_file()
    path = ctx.cache / rel
    size = path.stat().st_size
    how = ctx.pick("to", ["random", "zero", "minus_one", "half", "footer"], [5, 1, 1, 1, 1])
    new = {
        "random": ctx.rng.randrange(max(1, size)),
        "zero": 0,
        "minus_one": max(0, size - 1),
        "half": size // 2,
        "footer": max(0, size - 8),
    }[how]
    ctx.params["new_size"] = new
    with open(path, "r+b") as f:
        f.truncate(new)
    _maybe_fixup(ctx, rel)


def m_extend(ctx: Ctx):
    rel = ctx.target_file()
    path = ctx.cache / rel
    how = ctx.pick("junk", ["random", "zeros", "copy_of_itself", "json_tail", "parquet_magic"])
    n = ctx.randint("junk_bytes", 1, 4096)
    data = path.read_bytes()
    junk = {
        "random": ctx.rng.randbytes(n),
        "zeros": bytes(n),
        "copy_of_itself": data,
        "json_tail": b'\n{"id": "x", "reason": "junk"}\n' if rel.endswith(".jsonl") else b'{"format_version": 2}',
        "parquet_magic": b"PAR1" + bytes(n) + b"PAR1",
    }[how]
    with open(path, "ab") as f:
        f.write(junk)
    _maybe_fixup(ctx, rel)


def _maybe_fixup(ctx: Ctx, rel: str):
    if rel == "manifest.json" or rel == "README.md":
        return
    if ctx.pick("fixup", ["none", "sha256"]) == "sha256":
        fix_file_entry(ctx, rel)
        ctx.lie_ok = True  # vouched-for bytes may decode to other data that is still valid


def m_shard_swap(ctx: Ctx):
    """A shard's bytes replaced by a shard of another cache (or another of its own), with or without
    the manifest's bytes/sha256 fixed up (then only the deeper checks can catch it)."""
    i = ctx.shard_index()
    m = ctx.manifest()
    target = ctx.cache / m["shards"][i]["file"]
    ctx.touch(target.name)
    source = ctx.pick("from", ["own_cache", "compatible_cache", "any_cache"])
    if source == "compatible_cache":
        path, _ = ctx.compatible_donor(m["shards"][i]["rows"])
    else:
        own = [(str(ctx.cache / e["file"]), e) for j, e in enumerate(m["shards"]) if j != i]
        if source == "own_cache" and not own:  # a one-shard cache: another cache's
            source = ctx.params["from"] = "any_cache"
        pool = (
            own
            if source == "own_cache"
            else ctx.donors(exclude=str(Path(ctx.bases[ctx.base]) / m["shards"][i]["file"]))
        )
        pool = [p for p in pool if p[1]["rows"] != m["shards"][i]["rows"]] or pool
        path = pool[ctx.randint("donor_index", 0, len(pool) - 1)][0]
    ctx.params["donor"] = str(Path(path).relative_to(Path(path).parents[1]))
    shutil.copyfile(path, target)
    if ctx.pick("fixup", ["none", "sha256"], [1, 2]) == "sha256":
        fix_file_entry(ctx, target.name)


HUGE_INT = "1" + "0" * 5000


def hostile_values(orig) -> dict:
    """Hostile JSON values for a manifest field, by label (some derived from the original value)."""
    vals = {
        "true": True,
        "false": False,
        "null": None,
        "zero": 0,
        "minus_one": -1,
        "empty_string": "",
        "empty_list": [],
        "empty_object": {},
        "2**31": 2**31,
        "2**63": 2**63,
        "2**64": 2**64,
        "-2**63": -(2**63),
        "huge_int_5000_digits": Raw(HUGE_INT, "10**5000"),
        "NaN": Raw("NaN"),
        "Infinity": Raw("Infinity"),
        "-Infinity": Raw("-Infinity"),
        "1e400": Raw("1e400"),
        "-0.0": -0.0,
        "half": 0.5,
        "deep_array_100k": Raw("[" * 100_000 + "]" * 100_000, "[[[...100k]]]"),
        "deep_object_50k": Raw('{"a":' * 50_000 + "1" + "}" * 50_000, '{"a":{"a":...50k}}'),
        "string": "kdcache",
        "esc_string": "\x1b[31mred\x1b[0m\r\n# injected",
        "long_string": "x" * 100_000,
        "list_of_ints": [1, 2, 3],
        "object": {"a": 1},
        "name_dotdot": "../x.parquet",
        "name_pct": "%2e%2e%2fx.parquet",
        "name_slash": "a/b",
        "name_esc": "\x1b[31mred.parquet",
        "name_abs": "/etc/passwd",
        "name_nul": "x\x00.parquet",
        "name_backslash": "..\\x.parquet",
        "name_dot": ".",
    }
    if isinstance(orig, int) and not isinstance(orig, bool):
        vals.update(
            float_of_int=float(orig),
            string_of_int=str(orig),
            bool_of_int=bool(orig),
            plus_one=orig + 1,
            minus_one_of=orig - 1,
            negated=-orig if orig else -1,
            times_1000=orig * 1000,
        )
    elif isinstance(orig, float):
        vals.update(string_of_float=str(orig), int_of_float=int(orig))
    elif isinstance(orig, str):
        vals.update(upper=orig.upper(), with_space=orig + " ", with_nul=orig + "\x00", bytes_like=orig.encode().hex())
    elif isinstance(orig, list):
        vals.update(
            doubled=orig + orig, one_element=orig[:1], nested=[orig], as_object={str(i): v for i, v in enumerate(orig)}
        )
    elif isinstance(orig, dict):
        vals.update(
            as_list=list(orig.values()),
            with_unknown_key={**orig, "unknown_key": 1},
            without_a_key=dict(list(orig.items())[1:]),
        )
    return vals


INTERESTING_PATHS = [
    ("format_version",),
    ("k",),
    ("codec",),
    ("codec", "k"),
    ("codec", "hot"),
    ("codec", "mass"),
    ("codec", "name"),
    ("codec", "logprob_step"),
    ("mode",),
    ("counts",),
    ("counts", "examples"),
    ("counts", "positions"),
    ("counts", "rejects"),
    ("counts", "bytes"),
    ("counts", "inputs"),
    ("counts", "rejects_by_reason"),
    ("counts", "bytes_per_position"),
    ("shards",),
    ("shards", 0),
    ("shards", 0, "file"),
    ("shards", 0, "rows"),
    ("shards", 1, "positions"),
    ("shards", 1, "bytes"),
    ("shards", 0, "sha256"),
    ("rejects_file",),
    ("rejects_file", "file"),
    ("rejects_file", "count"),
    ("rejects_file", "sha256"),
    ("teacher", "output_size"),
    ("tokenizer", "vocab_size"),
    ("extra", "template", "max_length"),
    ("extra", "sampling", "max_new_tokens"),
    ("teacher", "name_or_path"),
    ("dataset", "name"),
    ("tokenizer", "fingerprint"),
    ("created",),
    ("command",),
    ("teacher",),
    ("tokenizer",),
    ("dataset",),
    ("extra",),
    ("extra", "template"),
    ("tokenizer_files",),
    ("tokenizer_files", 0, "file"),
    ("tokenizer_files", 0, "bytes"),
    ("tokenizer_files", 1, "sha256"),
]


def _get(obj, path):
    for key in path:
        obj = obj[key]
    return obj


def _exists(obj, path) -> bool:
    try:
        _get(obj, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


def m_manifest_value(ctx: Ctx):
    """One manifest field (or object) rewritten with a hostile value, or deleted."""
    m = ctx.manifest()
    interesting = [list(p) for p in INTERESTING_PATHS if _exists(m, p)]
    from .format_helpers import json_paths

    every = [list(p) for p in json_paths(m) if p]
    path = ctx.pick("path", interesting if ctx.rng.random() < 0.7 or "path" in ctx.forced else every)
    path = [
        int(k) if isinstance(k, str) and k.isdigit() and isinstance(_get(m, path[: path.index(k)]), list) else k
        for k in path
    ]
    parent, key = _get(m, path[:-1]), path[-1]
    if ctx.pick("action", ["set", "delete"], [6, 1]) == "delete":
        del parent[key]
    else:
        values = hostile_values(parent[key])
        label = ctx.pick("value", sorted(values))
        parent[key] = values[label]
    ctx.save_manifest(m)


def m_manifest_dup_key(ctx: Ctx):
    """A key twice in one object of the manifest (raw JSON text): which one counts depends on the parser."""
    m = ctx.manifest()
    objects = [
        list(p)
        for p in (
            ("",),
            ("codec",),
            ("counts",),
            ("shards", 0),
            ("rejects_file",),
            ("teacher",),
            ("extra", "template"),
            ("tokenizer_files", 0),
        )
        if p == ("",) or _exists(m, p)
    ]
    where = ctx.pick("object", objects)
    where = [] if where == [""] else where
    obj = _get(m, where)
    key = ctx.pick("key", sorted(obj))
    orig = obj[key]
    how = ctx.pick("dup_value", ["same", "hostile", "other"])
    if how == "same":
        value = orig
    elif how == "hostile":
        values = hostile_values(orig)
        value = values[ctx.pick("value", sorted(values))]
    else:
        value = (
            orig + 1
            if isinstance(orig, int) and not isinstance(orig, bool)
            else "part-00000.parquet"
            if key == "file"
            else 2
            if key == "format_version"
            else {"k": 16}
            if key == "codec"
            else "other"
        )
    first = ctx.pick("dup_first", [True, False])
    items = [(k, v) for k, v in obj.items()]
    pos = [k for k, _ in items].index(key)
    items.insert(pos if first else pos + 1, (key, value))
    text = Raw("{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in items) + "}")
    if not where:
        ctx.save_manifest(None, text.text)
        return
    _get(m, where[:-1])[where[-1]] = text
    ctx.save_manifest(m)


def m_manifest_count(ctx: Ctx):
    """A count off by one (or more)."""
    m = ctx.manifest()
    fields = [
        p
        for p in (
            ("counts", "examples"),
            ("counts", "positions"),
            ("counts", "rejects"),
            ("counts", "bytes"),
            ("counts", "inputs"),
            ("shards", 0, "rows"),
            ("shards", 1, "positions"),
            ("shards", 0, "bytes"),
            ("rejects_file", "count"),
            ("tokenizer_files", 0, "bytes"),
        )
        if _exists(m, p)
    ]
    path = ctx.pick("path", [list(p) for p in fields])
    delta = ctx.pick("delta", [1, -1, 2, -2, 100])
    parent = _get(m, path[:-1])
    parent[path[-1]] += delta
    if ctx.pick("consistent", [False, True], [2, 1]) and path[0] == "shards":  # the totals agree with the entry
        field = {"rows": "examples", "positions": "positions", "bytes": "bytes"}[path[-1]]
        m["counts"][field] += delta
        if field == "examples" and "inputs" in m["counts"]:
            m["counts"]["inputs"] += delta
    ctx.save_manifest(m)


def m_manifest_k(ctx: Ctx):
    m = ctx.manifest()
    how = ctx.pick("k", ["top_level_only", "codec_only", "both_16", "both_4", "both_65535", "both_65536", "both_0"])
    value = {
        "top_level_only": 16,
        "codec_only": 16,
        "both_16": 16,
        "both_4": 4,
        "both_65535": 65535,
        "both_65536": 65536,
        "both_0": 0,
    }[how]
    if how != "codec_only":
        m["k"] = value
    if how != "top_level_only":
        m["codec"]["k"] = value
    ctx.save_manifest(m)
    if how.startswith("both") and ctx.pick("shards_too", [False, True]):  # the shards claim it too
        _set_shard_codecs(ctx, m["codec"])


def m_manifest_codec(ctx: Ctx):
    """Codec keys unknown or missing, another step, name, hot or mass."""
    m = ctx.manifest()
    c = m["codec"]
    how = ctx.pick(
        "codec",
        [
            "unknown_key",
            "drop_key",
            "logprob_step",
            "top1_step",
            "target_logprob_step",
            "name",
            "hot_2048",
            "hot_0",
            "hot_negative",
            "hot_huge",
            "mass_half",
            "mass_toggle",
            "mass_1.5",
            "mass_0",
            "mass_true",
            "steps_as_strings",
            "k_float",
        ],
    )
    if how == "unknown_key":
        c[ctx.pick("new_key", ["id_bits", "zstd_dict", "name2"])] = 1
    elif how == "drop_key":
        del c[ctx.pick("key", sorted(c))]
    elif how.endswith("_step"):
        c[how] = c[how] * 2
    elif how == "name":
        c["name"] = "kdcache-topk-v2"
    elif how.startswith("hot"):
        c["hot"] = {"hot_2048": 2048, "hot_0": 0, "hot_negative": -1, "hot_huge": 10**9}[how]
    elif how == "mass_toggle":
        c["mass"] = 0.9 if c.get("mass") is None else None
    elif how.startswith("mass"):
        c["mass"] = {"mass_half": 0.5, "mass_1.5": 1.5, "mass_0": 0, "mass_true": True}[how]
    elif how == "steps_as_strings":
        c["logprob_step"] = str(c["logprob_step"])
    else:
        c["k"] = float(c["k"])
    ctx.save_manifest(m)
    if ctx.pick("shards_too", [False, True]):  # every shard's kdcache metadata claims the same codec
        _set_shard_codecs(ctx, c)


def _set_shard_codecs(ctx: Ctx, codec: dict):
    from .format_helpers import rewrite_shard

    for i in range(len(ctx.manifest()["shards"])):
        rewrite_shard(ctx.cache, i, edit_metadata=lambda raw: {**raw, "codec": codec})
        ctx.touch(ctx.manifest()["shards"][i]["file"])


HOSTILE_NAMES = [
    "../x.parquet",
    "%2e%2e%2fx.parquet",
    "a/b",
    "\x1b[31mred.parquet",
    "ABSOLUTE",
    "",
    ".",
    "..",
    "..\\x.parquet",
    "x\x00.parquet",
    "C:x.parquet",
    "~/x.parquet",
    "part-00000.parquet ",
    "é.parquet",
    "s3://bucket/x.parquet",
    "file:///etc/passwd",
    "y" * 300 + ".parquet",
    "part-00000.txt",
    ".hidden.parquet",
    "part-00000.parquet\n",
    "-" * 201 + ".parquet",
]
# What docs/FORMAT.md allows a manifest to name (a name like this is a legitimate rename, not an attack).
SAFE_NAME = __import__("re").compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def m_manifest_name(ctx: Ctx):
    """A file name in the manifest rewritten to escape the cache (with a valid file planted where it would
    land, and the manifest's sizes, sha256 and counts made to match it): only the name check can refuse it."""
    m = ctx.manifest()
    roles = ["shard", "rejects"] + (["tokenizer"] if m.get("tokenizer_files") else [])
    role = ctx.pick("role", roles, [3, 1, 1][: len(roles)])
    name = ctx.pick(
        "name",
        [n for n in HOSTILE_NAMES if not SAFE_NAME.fullmatch(n) or (role == "shard" and not n.endswith(".parquet"))],
    )
    if name == "ABSOLUTE":
        name = str(ctx.case_dir / "abs.parquet")
    if role == "shard":
        i = ctx.shard_index()
        orig = ctx.cache / m["shards"][i]["file"]
        donor, entry = ctx.compatible_donor(m["shards"][i]["rows"])
        ctx.touch(orig.name)
        _plant(ctx, name, donor)
        adopt_shard(m, i, entry, donor)
        m["shards"][i]["file"] = name
    elif role == "rejects":
        orig = ctx.cache / m["rejects_file"]["file"]
        ctx.touch(orig.name)
        planted = ctx.case_dir / "planted-rejects.jsonl"  # as many rejects, other ids: reading it changes the data
        planted.write_text(
            "".join(
                json.dumps({"id": f"planted{j}", "reason": r["reason"], "source": ""}) + "\n"
                for j, r in enumerate(map(json.loads, orig.read_text().splitlines()))
            )
        )
        _plant(ctx, name, planted)
        m["rejects_file"].update(file=name, sha256=sha256_file(planted))
    else:
        j = ctx.randint("tokenizer_file", 0, len(m["tokenizer_files"]) - 1)
        orig = ctx.cache / "tokenizer" / m["tokenizer_files"][j]["file"]
        ctx.touch(orig.name)
        _plant(ctx, name, orig, folder=ctx.cache / "tokenizer")
        m["tokenizer_files"][j]["file"] = name
    if ctx.pick("remove_original", [True, False], [3, 1]):  # else verify may refuse it as unlisted first
        orig.unlink()
    ctx.save_manifest(m)


def _plant(ctx: Ctx, name: str, source, folder: Path | None = None):
    """Copy `source` to where a reader that trusted `name` (resolved in `folder`) would open it."""
    folder = folder or ctx.cache
    targets = []
    if name and "\x00" not in name:
        if name.startswith("/"):
            targets.append(Path(name))
        elif "://" not in name:
            targets.append(folder / name.replace("\\", "/"))
        targets.append(folder / "x.parquet" if False else ctx.case_dir / "x.parquet")
        if "%2e" in name:
            targets.append(folder / name)  # the literal name, too
    for t in targets:
        try:
            t = Path(os.path.normpath(t))
            if not str(t).startswith(str(ctx.case_dir)) or t.is_dir():
                continue
            t.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, t)
        except OSError:
            pass


def m_manifest_entries(ctx: Ctx):
    """The shard list itself: an entry twice, missing, reordered, malformed."""
    m = ctx.manifest()
    how = ctx.pick(
        "entries",
        [
            "duplicate_entry",
            "duplicate_entry_counted",
            "same_sha256",
            "swap_order",
            "drop_entry",
            "drop_entry_counted",
            "missing_key",
            "extra_key",
            "not_a_list",
            "empty_list",
            "entry_not_object",
            "100k_entries",
            "rows_as_string",
            "sha256_uppercase",
        ],
    )
    s, c = m["shards"], m["counts"]
    i = ctx.shard_index()
    ctx.touch(s[i]["file"])
    if how.startswith("duplicate_entry"):
        s.append(dict(s[i]))
        if how.endswith("counted"):
            for f, cf in (("rows", "examples"), ("positions", "positions"), ("bytes", "bytes")):
                c[cf] += s[i][f]
            if "inputs" in c:
                c["inputs"] += s[i]["rows"]
    elif how == "same_sha256":
        s[(i + 1) % len(s)]["sha256"] = s[i]["sha256"]
    elif how == "swap_order":
        s.reverse()
    elif how.startswith("drop_entry"):
        e = s.pop(i)
        if how.endswith("counted"):
            for f, cf in (("rows", "examples"), ("positions", "positions"), ("bytes", "bytes")):
                c[cf] -= e[f]
    elif how == "missing_key":
        del s[i][ctx.pick("key", ["file", "rows", "positions", "bytes", "sha256"])]
    elif how == "extra_key":
        s[i]["evil"] = {"x": 1}
    elif how == "not_a_list":
        m["shards"] = {e["file"]: e for e in s}
    elif how == "empty_list":
        m["shards"] = []
    elif how == "entry_not_object":
        s[i] = s[i]["file"]
    elif how == "100k_entries":
        m["shards"] = s + [dict(s[i]) for _ in range(100_000)]
    elif how == "rows_as_string":
        s[i]["rows"] = str(s[i]["rows"])
    else:
        s[i]["sha256"] = s[i]["sha256"].upper()
    ctx.save_manifest(m)


def m_manifest_bomb(ctx: Ctx):
    """The whole manifest.json replaced: JSON bombs, other encodings, not an object."""
    orig = (ctx.cache / "manifest.json").read_bytes()
    how = ctx.pick(
        "bomb",
        [
            "deep_array_100k",
            "deep_object_100k",
            "containers_3M",
            "int_100k_digits",
            "NaN",
            "big_65MiB",
            "utf8_bom",
            "utf16",
            "empty",
            "list",
            "string",
            "null",
            "invalid_utf8",
            "trailing_garbage",
            "two_documents",
            "lone_surrogate",
            "wide_object_1M_keys",
        ],
        [3, 2, 2, 2, 1, 0.3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0.5],
    )
    text = {
        "deep_array_100k": lambda: b"[" * 100_000 + b"]" * 100_000,
        "deep_object_100k": lambda: b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        "containers_3M": lambda: b'{"shards": [' + b"{}," * 3_000_000 + b"{}]}",
        "int_100k_digits": lambda: b'{"format_version": 1' + b"0" * 100_000 + b"}",
        "NaN": lambda: re.sub(rb'"format_version": \d+', b'"format_version": NaN', orig, count=1),
        "big_65MiB": lambda: orig[:-1] + b', "pad": "' + b" " * (65 << 20) + b'"}',
        "utf8_bom": lambda: b"\xef\xbb\xbf" + orig,
        "utf16": lambda: orig.decode().encode("utf-16"),
        "empty": lambda: b"",
        "list": lambda: b"[" + orig + b"]",
        "string": lambda: json.dumps(orig.decode()).encode(),
        "null": lambda: b"null",
        "invalid_utf8": lambda: orig.replace(b'"unit"', b'"\xff\xfe"', 1),
        "trailing_garbage": lambda: orig + b"}}garbage",
        "two_documents": lambda: orig + b"\n" + orig,
        "lone_surrogate": lambda: orig.replace(b'"unit"', b'"\\ud800"', 1),
        "wide_object_1M_keys": lambda: orig[:-1] + b", " + b", ".join(b'"k%d": 0' % j for j in range(1_000_000)) + b"}",
    }[how]()
    ctx.save_manifest(None, text)


# -- shard rewrites (rewrite_shard keeps the manifest consistent: only the deeper checks can refuse) --

META_BOMBS = {
    "deep_array_100k": "[" * 100_000 + "]" * 100_000,
    "deep_object_100k": '{"a":' * 100_000 + "1" + "}" * 100_000,
    "huge_int": '{"n": ' + HUGE_INT + "}",
    "NaN": '{"n": NaN}',
    "Infinity": '{"n": -Infinity}',
    "dup_key": '{"messages": [], "truncated": false, "messages": [{"role": "user", "content": "other"}]}',
    "not_object": "[1, 2, 3]",
    "null_text": "null",
    "invalid": '{"messages": [',
    "empty": "",
    "containers_3M": '{"a": [' + "[]," * 3_000_000 + "[]]}",
}


def _cell_edit(ctx: Ctx, column: str, fn):
    """edit_table that replaces one cell of `column` (a random row) by fn(old value, row)."""
    from .format_helpers import replace_column

    def edit(table):
        values = table.column(column).to_pylist()
        row = ctx.randint("row", 0, len(values) - 1)
        values[row] = fn(values[row], row, table)
        return replace_column(table, column, values)

    return edit


def m_shard_rewrite(ctx: Ctx):
    """A shard rewritten (its table or its kdcache metadata) with the manifest kept consistent."""
    import pyarrow as pa

    from .format_helpers import rewrite_shard

    i = ctx.shard_index()
    m = ctx.manifest()
    k = m["codec"]["k"]
    ctx.touch(m["shards"][i]["file"])
    what = ctx.pick(
        "rewrite",
        [
            "extra_column",
            "drop_column",
            "retype_column",
            "duplicate_column",
            "meta_bomb",
            "meta_over_64MiB",
            "finish_reason",
            "too_long",
            "mass_gt_1",
            "count_zero",
            "count_over_k",
            "stream_short",
            "stream_long",
            "span_start_zero",
            "span_end_past_L",
            "span_overlap",
            "num_targets_off",
            "rank_zero",
            "id_empty",
            "id_5000_chars",
            "input_id_out_of_range",
            "input_id_negative",
            "hot_table",
            "metadata",
        ],
        [2, 2, 2, 1, 4, 0.3, 2, 2, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4],
    )
    edit_table = edit_metadata = None
    if what == "extra_column":

        def edit_table(t):
            return t.append_column("evil", pa.array([1] * t.num_rows, pa.int64()))
    elif what == "drop_column":
        col = ctx.pick(
            "column", ["meta", "source", "topk_step_escape", "target_rank", "id", "finish_reason", "topk_code_b1"]
        )

        def edit_table(t):
            return t.drop_columns([col])
    elif what == "retype_column":
        col, typ = ctx.pick(
            "column",
            [
                ["input_ids", "list<int64>"],
                ["id", "large_string"],
                ["topk_count", "large_binary"],
                ["num_targets", "int64"],
                ["meta", "binary"],
                ["target_starts", "list<uint32>"],
            ],
        )
        types = {
            "list<int64>": pa.list_(pa.int64()),
            "large_string": pa.large_string(),
            "large_binary": pa.large_binary(),
            "int64": pa.int64(),
            "binary": pa.binary(),
            "list<uint32>": pa.list_(pa.uint32()),
        }

        def edit_table(t):
            j = t.schema.get_field_index(col)
            return t.set_column(j, pa.field(col, types[typ]), t.column(col).cast(types[typ]))
    elif what == "duplicate_column":

        def edit_table(t):
            return t.append_column(t.schema.field("id"), t.column("id"))
    elif what in ("meta_bomb", "meta_over_64MiB"):
        bomb = ctx.pick("bomb", sorted(META_BOMBS)) if what == "meta_bomb" else None
        text = (
            META_BOMBS[bomb] if bomb else '{"pad": "' + "a" * (64 << 20) + '"}'
        )  # one row's meta beyond the 64 MiB cap (FORMAT.md check 4)
        edit_table = _cell_edit(ctx, "meta", lambda v, r, t: text)
    elif what == "finish_reason":
        value = ctx.pick("finish", ["stop", "length"] if m["mode"] == "score" else ["bogus", None, "", "\x1b[2J"])
        edit_table = _cell_edit(ctx, "finish_reason", lambda v, r, t: value)
    elif what == "too_long":
        limit = m["extra"]["template"]["max_length"] + (
            m["extra"].get("sampling", {}).get("max_new_tokens", 0) if m["mode"] == "generate" else 0
        )
        edit_table = _cell_edit(
            ctx, "input_ids", lambda v, r, t: v + [7] * (limit - len(v) + ctx.randint("over", 1, 50))
        )
    elif what == "mass_gt_1":

        def edit_table(t):
            from .format_helpers import replace_column

            row = ctx.randint("row", 0, t.num_rows - 1)
            top1 = t.column("topk_top1").to_pylist()
            top1[row] = bytes(len(top1[row]))  # top-1 logprob 0 at every position
            t = replace_column(t, "topk_top1", top1)
            for name in [n for n in t.column_names if n.startswith("topk_step") and n != "topk_step_escape"]:
                step = t.column(name).to_pylist()  # every other entry at the top-1's logprob: one tie (v2: gaps)
                step[row] = bytes(b if b == 255 else 0 for b in step[row])
                t = replace_column(t, name, step)
            return t
    elif what in ("count_zero", "count_over_k"):
        value = 0 if what == "count_zero" else min(255, k + 1)
        edit_table = _cell_edit(ctx, "topk_count", lambda v, r, t: bytes([value]) + v[1:])
    elif what in ("stream_short", "stream_long"):
        col = ctx.pick(
            "stream",
            ["topk_count", "topk_top1", "topk_code_b0", "topk_code_b1", "topk_step_1", "target_logprob", "target_rank"],
        )
        edit_table = _cell_edit(ctx, col, lambda v, r, t: v[:-1] if what == "stream_short" else v + b"\x01")
    elif what == "span_start_zero":
        edit_table = _cell_edit(ctx, "target_starts", lambda v, r, t: [0] + v[1:])
    elif what == "span_end_past_L":
        edit_table = _cell_edit(ctx, "target_ends", lambda v, r, t: v[:-1] + [len(t.column("input_ids")[r]) + 3])
    elif what == "span_overlap":

        def edit_table(t):
            from .format_helpers import replace_column

            row = ctx.randint("row", 0, t.num_rows - 1)
            s, e, n = (t.column(c).to_pylist() for c in ("target_starts", "target_ends", "num_targets"))
            s[row], e[row] = [s[row][0]] + s[row], [e[row][0]] + e[row]  # the first span twice
            n[row] += e[row][0] - s[row][0]
            return replace_column(
                replace_column(replace_column(t, "target_starts", s), "target_ends", e), "num_targets", n
            )
    elif what == "num_targets_off":
        edit_table = _cell_edit(ctx, "num_targets", lambda v, r, t: v + ctx.pick("delta", [1, -1]))
    elif what == "rank_zero":
        edit_table = _cell_edit(ctx, "target_rank", lambda v, r, t: bytes(4) + v[4:])
    elif what == "id_empty":
        edit_table = _cell_edit(ctx, "id", lambda v, r, t: "")
    elif what == "id_5000_chars":
        edit_table = _cell_edit(ctx, "id", lambda v, r, t: v + "x" * 5000)
    elif what == "input_id_out_of_range":
        edit_table = _cell_edit(ctx, "input_ids", lambda v, r, t: [10**6] + v[1:])
    elif what == "input_id_negative":
        edit_table = _cell_edit(ctx, "input_ids", lambda v, r, t: v[:-1] + [-5])
    elif what == "hot_table":
        how = ctx.pick(
            "hot",
            [
                "duplicate_ids",
                "above_2**31",
                "too_many",
                "not_base64",
                "odd_length",
                "not_a_string",
                "ids_out_of_range",
                "missing",
            ],
        )

        def edit_metadata(raw):
            table = np.frombuffer(base64.b64decode(raw["hot_table"]), "<u4").astype(np.int64)
            if how == "duplicate_ids":
                table[1] = table[0]
            elif how == "above_2**31":
                table[0] = 2**31 + 5
            elif how == "too_many":
                table = np.arange(m["codec"]["hot"] + 1) + 100_000
            elif how == "ids_out_of_range":
                table = table + 5000
            enc = base64.b64encode(table.astype("<u4").tobytes()).decode()
            value = {
                "not_base64": "!!not base64!!",
                "odd_length": enc[:-4] + base64.b64encode(b"abc").decode(),
                "not_a_string": 12345,
            }.get(how, enc)
            out = {**raw, "hot_table": value}
            if how == "missing":
                del out["hot_table"]
            return out
    else:
        how = ctx.pick(
            "metadata",
            [
                "extra_key",
                "missing_key",
                "format_version_1",  # version 1 with codec v2: the other version's pairing
                "format_version_3",
                "format_version_true",
                "id_bytes_3",
                "id_bytes_4",
                "id_bytes_string",
                "codec_other",
                "codec_missing",
                "not_json",
                "deep_100k",
                "too_big_2MiB",
                "dup_key",
                "list",
                "no_kdcache_key",
            ],
        )

        def edit_metadata(raw):
            if how == "extra_key":
                return {**raw, "evil": 1}
            if how == "missing_key":
                out = dict(raw)
                del out[ctx.pick("key", sorted(raw))]
                return out
            if how.startswith("format_version"):
                return {**raw, "format_version": {"format_version_1": 1, "format_version_3": 3}.get(how, True)}
            if how.startswith("id_bytes"):
                return {**raw, "id_bytes": {"id_bytes_3": 3, "id_bytes_4": 4, "id_bytes_string": "2"}[how]}
            if how == "codec_other":
                return {**raw, "codec": {**raw["codec"], "mass": 0.5}}
            if how == "codec_missing":
                return {key: v for key, v in raw.items() if key != "codec"}
            if how == "not_json":
                return b"{not json"
            if how == "deep_100k":
                return b"[" * 100_000 + b"]" * 100_000
            if how == "too_big_2MiB":
                return json.dumps({**raw, "pad": "a" * (2 << 20)}).encode()
            if how == "dup_key":
                return json.dumps(raw)[:-1].encode() + b', "id_bytes": 4}'
            if how == "list":
                return json.dumps([raw]).encode()
            return b""

        if how == "no_kdcache_key":
            _drop_metadata(ctx, i)
            return
    rewrite_shard(ctx.cache, i, edit_table, edit_metadata)
    ctx.touch("manifest.json")


def _drop_metadata(ctx: Ctx, i: int):
    import pyarrow.parquet as pq

    path = ctx.shard_path(i)
    table = pq.read_table(path).replace_schema_metadata({})
    pq.write_table(table, path)
    fix_file_entry(ctx, path.name)


# -- the file system --------------------------------------------------------------------------------


def m_fs_replace(ctx: Ctx):
    """A file of the cache replaced by a symlink (outside, /dev/zero, dangling, a loop), a FIFO or a folder."""
    m = ctx.manifest()
    roles = ["shard", "rejects", "card", "manifest"] + (
        ["tokenizer", "tokenizer_dir"] if m.get("tokenizer_files") else []
    )
    role = ctx.pick("role", roles, [4, 2, 1, 1, 1, 1][: len(roles)])
    rel = "tokenizer" if role == "tokenizer_dir" else ctx.pick("file", ctx.files()[role])
    path = ctx.cache / rel
    ctx.touch(rel)
    kinds = [
        "symlink_outside_same",
        "symlink_devzero",
        "symlink_devnull",
        "fifo",
        "directory",
        "symlink_dangling",
        "symlink_loop",
        "symlink_inside",
    ]
    if role == "shard":
        kinds.append("symlink_outside_donor")
    if role == "tokenizer_dir":
        kinds = ["symlink_outside_same", "symlink_dangling", "fifo", "empty_directory_file"]
    what = ctx.pick("replace_with", kinds)
    outside = ctx.case_dir / ("outside-" + path.name)
    if what == "symlink_outside_same":
        (shutil.copytree if path.is_dir() else shutil.copyfile)(path, outside)
    remove(path)
    if what in ("symlink_outside_same", "symlink_dangling"):
        path.symlink_to(outside)
    elif what == "symlink_outside_donor":
        i = [s["file"] for s in m["shards"]].index(rel)
        donor, entry = ctx.compatible_donor(m["shards"][i]["rows"])
        shutil.copyfile(donor, outside)
        path.symlink_to(outside)
        adopt_shard(m, i, entry, outside)
        ctx.save_manifest(m)
    elif what == "symlink_devzero":
        path.symlink_to("/dev/zero")
    elif what == "symlink_devnull":
        path.symlink_to("/dev/null")
    elif what == "fifo":
        os.mkfifo(path)
    elif what in ("directory", "empty_directory_file"):
        path.mkdir()
        if what == "directory":
            (path / "inner.json").write_text("{}")
    elif what == "symlink_loop":
        path.symlink_to(path.name)
    else:  # another file of the cache
        others = [f for f in ("manifest.json", "README.md", *m_shard_files(m)) if f != rel]
        path.symlink_to(ctx.pick("link_to", others))


def m_shard_files(m):
    return [s["file"] for s in m["shards"]]


def m_fs_extra(ctx: Ctx):
    """Something the manifest does not list, added to the folder."""
    m = ctx.manifest()
    kinds = [
        "unlisted_parquet",
        "unlisted_parquet_subdir",
        "unlisted_file",
        "fifo_extra",
        "symlink_extra_passwd",
        "symlink_extra_devzero_parquet",
        "leftover_progress",
        "socket_extra",
        "hidden_dir_parquet",
    ]
    if m.get("tokenizer_files"):
        kinds += ["extra_tokenizer_file", "tokenizer_subdir"]
    else:
        kinds.append("tokenizer_dir_unlisted")
    what = ctx.pick("extra", kinds)
    first = ctx.cache / m["shards"][0]["file"]
    name = {
        "unlisted_parquet": "part-00099.parquet",
        "unlisted_parquet_subdir": "sub/part-00000.parquet",
        "unlisted_file": "notes.txt",
        "fifo_extra": "x.fifo",
        "symlink_extra_passwd": "evil",
        "symlink_extra_devzero_parquet": "zero.parquet",
        "leftover_progress": "_progress/job.json",
        "socket_extra": "s.sock",
        "hidden_dir_parquet": ".hidden/part-00000.parquet",
        "extra_tokenizer_file": "tokenizer/evil.json",
        "tokenizer_subdir": "tokenizer/sub/vocab.json",
        "tokenizer_dir_unlisted": "tokenizer/tokenizer.json",
    }[what]
    path = ctx.cache / name
    ctx.touch(name)
    ctx.names.add(name.split("/")[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    if what in ("unlisted_parquet", "unlisted_parquet_subdir", "hidden_dir_parquet"):
        shutil.copyfile(first, path)
    elif what == "fifo_extra":
        os.mkfifo(path)
    elif what == "symlink_extra_passwd":
        path.symlink_to("/etc/passwd")
    elif what == "symlink_extra_devzero_parquet":
        path.symlink_to("/dev/zero")
    elif what == "socket_extra":
        import socket

        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(path))
        except OSError:  # a path too long for a socket: a FIFO instead
            os.mkfifo(path)
        finally:
            s.close()
    else:
        path.write_text('{"evil": true}\n')


def m_rejects_edit(ctx: Ctx):
    """rejects.jsonl lines rewritten (JSON bombs, wrong types, ids twice, an example's id, long lines, other
    encodings), with its sha256 fixed up in the manifest or not."""
    m = ctx.manifest()
    if not m.get("rejects_file"):
        return m_flip(ctx)
    rel = m["rejects_file"]["file"]
    ctx.touch(rel)
    path = ctx.cache / rel
    lines = path.read_bytes().splitlines()
    how = ctx.pick(
        "line",
        [
            "deep_array_100k",
            "deep_object_100k",
            "huge_int",
            "NaN",
            "dup_key",
            "not_object",
            "missing_id",
            "id_not_string",
            "reason_not_string",
            "example_id",
            "dup_id",
            "long_line_70KiB",
            "invalid_utf8",
            "extra_line",
            "missing_line",
            "reason_tally",
            "crlf",
            "blank_lines",
            "containers_100k",
            "huge_file",
        ],
    )
    j = ctx.randint("row", 0, len(lines) - 1)
    r = json.loads(lines[j])
    example_id = "ex0" if ctx.base == "plain" else "g0" if ctx.base == "gen" else "t0"
    new = {
        "deep_array_100k": b"[" * 100_000 + b"]" * 100_000,
        "deep_object_100k": b'{"id": "r1", "reason": "x", "d": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001,
        "huge_int": b'{"id": "%s", "reason": "x", "n": ' % r["id"].encode() + HUGE_INT.encode() + b"}",
        "NaN": b'{"id": "%s", "reason": "x", "n": NaN}' % r["id"].encode(),
        "dup_key": b'{"id": "%s", "reason": "%s", "id": "other"}' % (r["id"].encode(), r["reason"].encode()),
        "not_object": b'["id", "reason"]',
        "missing_id": json.dumps({"reason": r["reason"]}).encode(),
        "id_not_string": json.dumps({"id": 7, "reason": r["reason"]}).encode(),
        "reason_not_string": json.dumps({"id": r["id"], "reason": ["x"]}).encode(),
        "example_id": json.dumps({**r, "id": example_id}).encode(),
        "dup_id": json.dumps({**r, "id": json.loads(lines[(j + 1) % len(lines)])["id"]}).encode(),
        "long_line_70KiB": json.dumps({**r, "source": "s" * (70 << 10)}).encode(),
        "invalid_utf8": json.dumps(r).encode().replace(b'"tulu"', b'"\xff\xfe"') + b"\xff",
        "containers_100k": b'{"id": "%s", "reason": "x", "d": [' % r["id"].encode() + b"[]," * 100_000 + b"[]]}",
    }.get(how)
    if new is not None:
        lines[j] = new
    elif how == "extra_line":
        lines.append(json.dumps({"id": "extra-reject", "reason": r["reason"], "source": ""}).encode())
    elif how == "missing_line":
        del lines[j]
    elif how == "reason_tally":
        lines[j] = json.dumps({**r, "reason": "other_reason"}).encode()
    elif how == "blank_lines":
        lines = [b""] + [x for line in lines for x in (line, b"", b"   ")]
    elif how == "huge_file":
        lines.append(b" " * (200 << 20))  # 200 MiB of one "line" of spaces
    data = (b"\r\n" if how == "crlf" else b"\n").join(lines) + b"\n"
    path.write_bytes(data)
    if ctx.pick("fixup", ["sha256", "none"], [3, 1]) == "sha256":
        fix_file_entry(ctx, rel)


MUTATIONS = {  # kind: (weight, operator)
    "flip": (14, m_flip),
    "truncate": (8, m_truncate),
    "extend": (6, m_extend),
    "shard_swap": (6, m_shard_swap),
    "manifest_value": (14, m_manifest_value),
    "manifest_dup_key": (4, m_manifest_dup_key),
    "manifest_count": (4, m_manifest_count),
    "manifest_k": (3, m_manifest_k),
    "manifest_codec": (4, m_manifest_codec),
    "manifest_name": (6, m_manifest_name),
    "manifest_entries": (4, m_manifest_entries),
    "manifest_bomb": (4, m_manifest_bomb),
    "shard_rewrite": (14, m_shard_rewrite),
    "fs_replace": (8, m_fs_replace),
    "fs_extra": (4, m_fs_extra),
    "rejects_edit": (6, m_rejects_edit),
}


# ==== regression cases: one (or a few) per mutation kind, with forced parameters ====================

REGRESSION = {
    # name: (base, kind, forced parameters)
    "flip-shard": ("plain", "flip", {"role": "shard", "file": "part-00001.parquet", "flips": 3, "fixup": "none"}),
    "flip-shard-fixed-sha": (
        "plain",
        "flip",
        {"role": "shard", "file": "part-00000.parquet", "flips": 4, "fixup": "sha256"},
    ),
    "flip-manifest": ("gen", "flip", {"role": "manifest", "file": "manifest.json", "flips": 2}),
    "flip-rejects-fixed-sha": (
        "plain",
        "flip",
        {"role": "rejects", "file": "rejects.jsonl", "flips": 2, "fixup": "sha256"},
    ),
    "flip-tokenizer-json-fixed-sha": (
        "tok",
        "flip",
        {"role": "tokenizer", "file": "tokenizer/tokenizer.json", "flips": 5, "fixup": "sha256"},
    ),
    "truncate-shard-footer-fixed-sha": (
        "plain",
        "truncate",
        {"role": "shard", "file": "part-00000.parquet", "to": "footer", "fixup": "sha256"},
    ),
    "truncate-shard-zero": (
        "gen",
        "truncate",
        {"role": "shard", "file": "part-00000.parquet", "to": "zero", "fixup": "none"},
    ),
    "truncate-manifest-half": ("plain", "truncate", {"role": "manifest", "file": "manifest.json", "to": "half"}),
    "extend-shard-fixed-sha": (
        "plain",
        "extend",
        {"role": "shard", "file": "part-00002.parquet", "junk": "random", "junk_bytes": 1000, "fixup": "sha256"},
    ),
    "extend-rejects-json-tail": (
        "plain",
        "extend",
        {"role": "rejects", "file": "rejects.jsonl", "junk": "json_tail", "junk_bytes": 1, "fixup": "sha256"},
    ),
    "swap-foreign-shard": ("plain", "shard_swap", {"shard": 0, "from": "compatible_cache", "fixup": "none"}),
    "swap-foreign-shard-fixed-sha": (
        "plain",
        "shard_swap",
        {"shard": 0, "from": "compatible_cache", "fixup": "sha256"},
    ),
    "swap-other-codec-shard-fixed-sha": ("gen", "shard_swap", {"shard": 1, "from": "any_cache", "fixup": "sha256"}),
    "swap-own-shard-fixed-sha": ("plain", "shard_swap", {"shard": 2, "from": "own_cache", "fixup": "sha256"}),
    "manifest-version-true": (
        "plain",
        "manifest_value",
        {"path": ["format_version"], "action": "set", "value": "true"},
    ),
    "manifest-version-float": (
        "plain",
        "manifest_value",
        {"path": ["format_version"], "action": "set", "value": "float_of_int"},
    ),
    "manifest-rows-huge-int": (
        "plain",
        "manifest_value",
        {"path": ["shards", 0, "rows"], "action": "set", "value": "huge_int_5000_digits"},
    ),
    "manifest-rows-2**63": (
        "plain",
        "manifest_value",
        {"path": ["shards", 0, "rows"], "action": "set", "value": "2**63"},
    ),
    "manifest-examples-negative": (
        "gen",
        "manifest_value",
        {"path": ["counts", "examples"], "action": "set", "value": "minus_one"},
    ),
    "manifest-bytes-NaN": ("plain", "manifest_value", {"path": ["counts", "bytes"], "action": "set", "value": "NaN"}),
    "manifest-output-size-Infinity": (
        "plain",
        "manifest_value",
        {"path": ["teacher", "output_size"], "action": "set", "value": "Infinity"},
    ),
    "manifest-max-length-string": (
        "plain",
        "manifest_value",
        {"path": ["extra", "template", "max_length"], "action": "set", "value": "string_of_int"},
    ),
    "manifest-shards-deep-array": (
        "plain",
        "manifest_value",
        {"path": ["shards"], "action": "set", "value": "deep_array_100k"},
    ),
    "manifest-counts-null": ("plain", "manifest_value", {"path": ["counts"], "action": "set", "value": "null"}),
    "manifest-teacher-esc": (
        "plain",
        "manifest_value",
        {"path": ["teacher", "name_or_path"], "action": "set", "value": "esc_string"},
    ),
    "manifest-codec-deleted": ("plain", "manifest_value", {"path": ["codec"], "action": "delete"}),
    "manifest-tokenizer-files-empty": (
        "tok",
        "manifest_value",
        {"path": ["tokenizer_files"], "action": "set", "value": "empty_list"},
    ),
    "dup-key-format-version": (
        "plain",
        "manifest_dup_key",
        {"object": [""], "key": "format_version", "dup_value": "other", "dup_first": False},
    ),
    "dup-key-shard-file": (
        "plain",
        "manifest_dup_key",
        {"object": ["shards", 0], "key": "file", "dup_value": "other", "dup_first": True},
    ),
    "dup-key-codec-same-value": (
        "gen",
        "manifest_dup_key",
        {"object": ["codec"], "key": "k", "dup_value": "same", "dup_first": False},
    ),
    "count-rows-plus-one": ("plain", "manifest_count", {"path": ["shards", 0, "rows"], "delta": 1, "consistent": True}),
    "count-rejects-minus-one": (
        "plain",
        "manifest_count",
        {"path": ["counts", "rejects"], "delta": -1, "consistent": False},
    ),
    "count-inputs-plus-one": ("gen", "manifest_count", {"path": ["counts", "inputs"], "delta": 1, "consistent": False}),
    "k-top-level-only": ("plain", "manifest_k", {"k": "top_level_only"}),
    "k-both-16-shards-too": ("plain", "manifest_k", {"k": "both_16", "shards_too": True}),
    "k-both-65536": ("gen", "manifest_k", {"k": "both_65536", "shards_too": False}),
    "codec-unknown-key": (
        "plain",
        "manifest_codec",
        {"codec": "unknown_key", "new_key": "id_bits", "shards_too": False},
    ),
    "codec-logprob-step-shards-too": ("plain", "manifest_codec", {"codec": "logprob_step", "shards_too": True}),
    "codec-mass-toggle-shards-too": ("gen", "manifest_codec", {"codec": "mass_toggle", "shards_too": True}),
    "codec-hot-0-shards-too": ("plain", "manifest_codec", {"codec": "hot_0", "shards_too": True}),
    "name-dotdot": (
        "plain",
        "manifest_name",
        {"role": "shard", "name": "../x.parquet", "shard": 1, "remove_original": True},
    ),
    "name-percent-encoded": (
        "plain",
        "manifest_name",
        {"role": "shard", "name": "%2e%2e%2fx.parquet", "shard": 0, "remove_original": True},
    ),
    "name-slash": ("gen", "manifest_name", {"role": "shard", "name": "a/b", "shard": 0, "remove_original": True}),
    "name-esc": (
        "plain",
        "manifest_name",
        {"role": "shard", "name": "\x1b[31mred.parquet", "shard": 2, "remove_original": True},
    ),
    "name-absolute": (
        "plain",
        "manifest_name",
        {"role": "shard", "name": "ABSOLUTE", "shard": 0, "remove_original": True},
    ),
    "name-empty": ("plain", "manifest_name", {"role": "shard", "name": "", "shard": 0, "remove_original": False}),
    "name-rejects-dotdot": (
        "plain",
        "manifest_name",
        {"role": "rejects", "name": "../x.parquet", "remove_original": True},
    ),
    "name-tokenizer-dotdot": (
        "tok",
        "manifest_name",
        {"role": "tokenizer", "name": "../tokenizer.json", "tokenizer_file": 0, "remove_original": True},
    ),
    "entries-duplicate-counted": ("plain", "manifest_entries", {"entries": "duplicate_entry_counted", "shard": 0}),
    "entries-drop-counted": ("plain", "manifest_entries", {"entries": "drop_entry_counted", "shard": 1}),
    "entries-not-a-list": ("gen", "manifest_entries", {"entries": "not_a_list", "shard": 0}),
    "entries-100k": ("plain", "manifest_entries", {"entries": "100k_entries", "shard": 0}),
    "entries-swap-order": ("plain", "manifest_entries", {"entries": "swap_order", "shard": 0}),
    "bomb-manifest-deep-array": ("plain", "manifest_bomb", {"bomb": "deep_array_100k"}),
    "bomb-manifest-containers": ("plain", "manifest_bomb", {"bomb": "containers_3M"}),
    "bomb-manifest-int-digits": ("plain", "manifest_bomb", {"bomb": "int_100k_digits"}),
    "bomb-manifest-65MiB": ("plain", "manifest_bomb", {"bomb": "big_65MiB"}),
    "bomb-manifest-1M-keys": ("gen", "manifest_bomb", {"bomb": "wide_object_1M_keys"}),
    "manifest-utf16": ("plain", "manifest_bomb", {"bomb": "utf16"}),
    "manifest-lone-surrogate": ("plain", "manifest_bomb", {"bomb": "lone_surrogate"}),
    "rewrite-extra-column": ("plain", "shard_rewrite", {"shard": 0, "rewrite": "extra_column"}),
    "rewrite-retype-input-ids": (
        "plain",
        "shard_rewrite",
        {"shard": 1, "rewrite": "retype_column", "column": ["input_ids", "list<int64>"]},
    ),
    "rewrite-meta-deep": (
        "plain",
        "shard_rewrite",
        {"shard": 0, "rewrite": "meta_bomb", "bomb": "deep_array_100k", "row": 2},
    ),
    "rewrite-meta-huge-int": (
        "gen",
        "shard_rewrite",
        {"shard": 0, "rewrite": "meta_bomb", "bomb": "huge_int", "row": 0},
    ),
    "rewrite-meta-dup-key": (
        "plain",
        "shard_rewrite",
        {"shard": 2, "rewrite": "meta_bomb", "bomb": "dup_key", "row": 1},
    ),
    "rewrite-meta-over-64MiB": ("plain", "shard_rewrite", {"shard": 1, "rewrite": "meta_over_64MiB", "row": 0}),
    "rewrite-finish-stop-in-score": (
        "plain",
        "shard_rewrite",
        {"shard": 0, "rewrite": "finish_reason", "finish": "stop", "row": 3},
    ),
    "rewrite-finish-bogus-in-generate": (
        "gen",
        "shard_rewrite",
        {"shard": 0, "rewrite": "finish_reason", "finish": "bogus", "row": 1},
    ),
    "rewrite-too-long": ("plain", "shard_rewrite", {"shard": 1, "rewrite": "too_long", "row": 0, "over": 5}),
    "rewrite-mass-gt-1": ("plain", "shard_rewrite", {"shard": 0, "rewrite": "mass_gt_1", "row": 1}),
    "rewrite-count-over-k": ("gen", "shard_rewrite", {"shard": 1, "rewrite": "count_over_k", "row": 0}),
    "rewrite-stream-short": (
        "plain",
        "shard_rewrite",
        {"shard": 0, "rewrite": "stream_short", "stream": "topk_step_1", "row": 0},
    ),
    "rewrite-span-overlap": ("plain", "shard_rewrite", {"shard": 2, "rewrite": "span_overlap", "row": 0}),
    "rewrite-rank-zero": ("plain", "shard_rewrite", {"shard": 0, "rewrite": "rank_zero", "row": 0}),
    "rewrite-input-id-negative": ("plain", "shard_rewrite", {"shard": 1, "rewrite": "input_id_negative", "row": 1}),
    "hot-duplicate-ids": ("plain", "shard_rewrite", {"shard": 0, "rewrite": "hot_table", "hot": "duplicate_ids"}),
    "hot-ids-out-of-range": ("plain", "shard_rewrite", {"shard": 0, "rewrite": "hot_table", "hot": "ids_out_of_range"}),
    "hot-too-many": ("gen", "shard_rewrite", {"shard": 0, "rewrite": "hot_table", "hot": "too_many"}),
    "metadata-id-bytes-4": ("plain", "shard_rewrite", {"shard": 0, "rewrite": "metadata", "metadata": "id_bytes_4"}),
    "metadata-deep": ("plain", "shard_rewrite", {"shard": 1, "rewrite": "metadata", "metadata": "deep_100k"}),
    "metadata-too-big": ("plain", "shard_rewrite", {"shard": 2, "rewrite": "metadata", "metadata": "too_big_2MiB"}),
    "metadata-dup-key": ("gen", "shard_rewrite", {"shard": 0, "rewrite": "metadata", "metadata": "dup_key"}),
    "metadata-none": ("plain", "shard_rewrite", {"shard": 0, "rewrite": "metadata", "metadata": "no_kdcache_key"}),
    "fifo-shard": ("plain", "fs_replace", {"role": "shard", "file": "part-00001.parquet", "replace_with": "fifo"}),
    "fifo-manifest": ("plain", "fs_replace", {"role": "manifest", "file": "manifest.json", "replace_with": "fifo"}),
    "fifo-rejects": ("gen", "fs_replace", {"role": "rejects", "file": "rejects.jsonl", "replace_with": "fifo"}),
    "fifo-readme": ("plain", "fs_replace", {"role": "card", "file": "README.md", "replace_with": "fifo"}),
    "fifo-tokenizer-file": (
        "tok",
        "fs_replace",
        {"role": "tokenizer", "file": "tokenizer/tokenizer.json", "replace_with": "fifo"},
    ),
    "devzero-shard": (
        "plain",
        "fs_replace",
        {"role": "shard", "file": "part-00000.parquet", "replace_with": "symlink_devzero"},
    ),
    "devzero-rejects": (
        "plain",
        "fs_replace",
        {"role": "rejects", "file": "rejects.jsonl", "replace_with": "symlink_devzero"},
    ),
    "devzero-manifest": (
        "gen",
        "fs_replace",
        {"role": "manifest", "file": "manifest.json", "replace_with": "symlink_devzero"},
    ),
    "symlink-shard-outside-donor": (
        "plain",
        "fs_replace",
        {"role": "shard", "file": "part-00002.parquet", "replace_with": "symlink_outside_donor"},
    ),
    "symlink-shard-outside-same": (
        "gen",
        "fs_replace",
        {"role": "shard", "file": "part-00000.parquet", "replace_with": "symlink_outside_same"},
    ),
    "symlink-readme-outside": (
        "plain",
        "fs_replace",
        {"role": "card", "file": "README.md", "replace_with": "symlink_outside_same"},
    ),
    "symlink-rejects-loop": (
        "plain",
        "fs_replace",
        {"role": "rejects", "file": "rejects.jsonl", "replace_with": "symlink_loop"},
    ),
    "symlink-tokenizer-file-outside": (
        "tok",
        "fs_replace",
        {"role": "tokenizer", "file": "tokenizer/tokenizer_config.json", "replace_with": "symlink_outside_same"},
    ),
    "symlink-tokenizer-dir-outside": (
        "tok",
        "fs_replace",
        {"role": "tokenizer_dir", "replace_with": "symlink_outside_same"},
    ),
    "directory-shard": (
        "plain",
        "fs_replace",
        {"role": "shard", "file": "part-00001.parquet", "replace_with": "directory"},
    ),
    "directory-manifest": (
        "plain",
        "fs_replace",
        {"role": "manifest", "file": "manifest.json", "replace_with": "directory"},
    ),
    "unlisted-part-00099": ("plain", "fs_extra", {"extra": "unlisted_parquet"}),
    "unlisted-parquet-in-subdir": ("gen", "fs_extra", {"extra": "unlisted_parquet_subdir"}),
    "extra-fifo": ("plain", "fs_extra", {"extra": "fifo_extra"}),
    "extra-devzero-parquet": ("plain", "fs_extra", {"extra": "symlink_extra_devzero_parquet"}),
    "extra-tokenizer-file": ("tok", "fs_extra", {"extra": "extra_tokenizer_file"}),
    "unlisted-tokenizer-dir": ("plain", "fs_extra", {"extra": "tokenizer_dir_unlisted"}),
    "rejects-deep-line": ("plain", "rejects_edit", {"line": "deep_array_100k", "row": 0, "fixup": "sha256"}),
    "rejects-huge-int": ("plain", "rejects_edit", {"line": "huge_int", "row": 1, "fixup": "sha256"}),
    "rejects-dup-key": ("gen", "rejects_edit", {"line": "dup_key", "row": 0, "fixup": "sha256"}),
    "rejects-example-id": ("plain", "rejects_edit", {"line": "example_id", "row": 0, "fixup": "sha256"}),
    "rejects-long-line": ("plain", "rejects_edit", {"line": "long_line_70KiB", "row": 2, "fixup": "sha256"}),
    "rejects-invalid-utf8": ("plain", "rejects_edit", {"line": "invalid_utf8", "row": 0, "fixup": "sha256"}),
    "rejects-huge-file": ("plain", "rejects_edit", {"line": "huge_file", "row": 0, "fixup": "sha256"}),
    "rejects-tally": ("gen", "rejects_edit", {"line": "reason_tally", "row": 1, "fixup": "sha256"}),
    "rejects-count-2**31": (
        "gen",
        "manifest_value",
        {"path": ["rejects_file", "count"], "action": "set", "value": "2**31"},
    ),
    "manifest-mode-deleted": ("gen", "manifest_value", {"path": ["mode"], "action": "delete"}),
    "rewrite-meta-empty-string": (
        "plain",
        "shard_rewrite",
        {"shard": 0, "rewrite": "meta_bomb", "bomb": "empty", "row": 0},
    ),
    "rejects-extra-line-no-fixup": ("plain", "rejects_edit", {"line": "extra_line", "row": 0, "fixup": "none"}),
}


def case_key(case: dict) -> str:
    if "selftest" in case:
        return f"selftest-{case['selftest']}"
    return case["name"] if "name" in case else f"{case['seed']}:{case['index']}"


def parse_case(text: str) -> dict:
    if text in REGRESSION:
        return {"name": text}
    seed, _, index = text.partition(":")
    return {"seed": int(seed), "index": int(index)}


def plan_case(case: dict) -> tuple[str, str, dict, random.Random]:
    """(base, mutation kind, forced parameters, rng) of a case."""
    if "name" in case:
        base, kind, forced = REGRESSION[case["name"]]
        return base, kind, forced, random.Random(f"regression:{case['name']}")
    rng = random.Random(f"{case['seed']}:{case['index']}")
    base = rng.choices(BASES, BASE_WEIGHTS)[0]
    kinds = sorted(MUTATIONS)
    kind = rng.choices(kinds, [MUTATIONS[k][0] for k in kinds])[0]
    return base, kind, {}, rng


def apply_case(case: dict, bases: dict, case_dir: Path) -> dict:
    """Copy the case's base cache to case_dir/cache and mutate it; returns the case's description."""
    if "selftest" in case:  # the harness's own checks: an operation that misbehaves on purpose
        return {
            "key": case_key(case),
            "base": "plain",
            "kind": "selftest",
            "variant": case["selftest"],
            "desc": f"selftest {case['selftest']}",
            "names": [],
            "lie_ok": False,
            "cache": bases["plain"],
            "ops": ["read"],
            "selftest": case["selftest"],
        }
    base, kind, forced, rng = plan_case(case)
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    cache = case_dir / "cache"
    shutil.copytree(bases[base], cache, symlinks=True)
    ctx = Ctx(base, cache, bases, rng, forced)
    MUTATIONS[kind][1](ctx)
    params = ", ".join(f"{k}={show(v, 60)}" for k, v in ctx.params.items())
    return {
        "key": case_key(case),
        "base": base,
        "kind": kind,
        "variant": _variant(kind, ctx.params),
        "desc": f"{kind}({params}) on {base}",
        "names": sorted(ctx.names),
        "lie_ok": ctx.lie_ok,
        "cache": str(cache),
        "ops": ops_for(base),
    }


def _variant(kind: str, params: dict) -> str:
    """The parameter that says which sort of mutation it was (for grouping)."""
    for key in (
        "rewrite",
        "replace_with",
        "extra",
        "line",
        "bomb",
        "entries",
        "codec",
        "k",
        "name",
        "to",
        "junk",
        "from",
        "value",
        "action",
    ):
        if key in params:
            value = params[key]
            if kind == "shard_rewrite" and value in ("hot_table", "metadata"):
                value = f"{value}:{params.get('hot', params.get('metadata'))}"
            if kind in ("fs_replace",):
                value = f"{params.get('role')}:{value}"
            return show(value, 40)
    return "-"


# ==== the oracle ==================================================================================


def _arr(a) -> tuple:
    a = np.asarray(a)
    return (str(a.dtype), a.shape, a.tobytes())


def canon(ex) -> tuple:
    try:
        meta = json.dumps(ex.meta, sort_keys=True)
    except (TypeError, ValueError):
        meta = repr(ex.meta)
    return (
        ex.id,
        ex.source,
        _arr(ex.input_ids),
        _arr(ex.target_positions),
        _arr(ex.topk_ids),
        _arr(ex.topk_logprobs),
        _arr(ex.target_logprobs),
        _arr(ex.target_ranks),
        ex.finish_reason,
        meta,
    )


FIELDS = (
    "id",
    "source",
    "input_ids",
    "target_positions",
    "topk_ids",
    "topk_logprobs",
    "target_logprobs",
    "target_ranks",
    "finish_reason",
    "meta",
)


def read_examples(path) -> list:
    from formats import CacheReader

    return list(CacheReader(str(path), prefetch=0))


def read_rejects(path) -> list[dict]:
    """The rejects as the trust boundary reads them (formats.tools.read_rejects)."""
    from formats import load_manifest, tools

    return tools.read_rejects(str(path), load_manifest(str(path)))


def canon_rejects(rejects) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True, default=repr) for r in rejects)


def data_difference(examples, expected: list) -> str | None:
    got = sorted(canon(ex) for ex in examples)
    if got == expected:
        return None
    if len(got) != len(expected):
        return f"{len(got)} examples read, the original has {len(expected)}"
    for g, e in zip(got, expected):
        if g != e:
            fields = [f for f, a, b in zip(FIELDS, g, e) if a != b]
            return f"example {show(g[0], 40)} differs in {', '.join(fields)} (original {show(e[0], 40)})"
    return "different examples"


def _json_problem(value, depth=0) -> str | None:
    if depth > 64:
        return "nests deeper than 64"
    if isinstance(value, float) and not np.isfinite(value):
        return f"holds {value}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return "holds a number of more than 40 digits"
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for v in value:
            p = _json_problem(v, depth + 1)
            if p:
                return p
    return None


def invariant_problems(examples, rejects, manifest: dict) -> list[str]:
    """What is wrong with data that differs from the original but that the manifest vouched for: every
    invariant docs/FORMAT.md says a reader guarantees (checks 3-7), against the ORIGINAL manifest."""
    problems = []
    mode, k = manifest["mode"], manifest["codec"]["k"]
    out = manifest["teacher"].get("output_size") or manifest["tokenizer"].get("vocab_size")
    vocab = max(out, manifest["tokenizer"].get("vocab_size") or 0)
    max_tokens = manifest["extra"]["template"]["max_length"] + (
        manifest["extra"]["sampling"]["max_new_tokens"] if mode == "generate" else 0
    )
    ids: set = set()
    positions = 0
    for ex in examples:
        w = f"example {show(ex.id, 40)}"
        if not isinstance(ex.id, str) or not ex.id or len(ex.id) > 4096 or ex.id in ids:
            problems.append(f"{w}: id empty, too long or twice")
        ids.add(ex.id)
        if not isinstance(ex.source, str) or len(ex.source) > 4096:
            problems.append(f"{w}: source")
        L, t = len(ex.input_ids), np.asarray(ex.target_positions, np.int64)
        N = len(t)
        positions += N
        if L > max_tokens:
            problems.append(f"{w}: {L} tokens > {max_tokens}")
        if L and (ex.input_ids.min() < 0 or ex.input_ids.max() >= vocab):
            problems.append(f"{w}: input_ids out of range")
        if N and (t[0] < 1 or t[-1] >= L or (np.diff(t) <= 0).any()):
            problems.append(f"{w}: target positions")
        ti, tl = np.asarray(ex.topk_ids), np.asarray(ex.topk_logprobs, np.float64)
        if (
            ti.ndim != 2
            or ti.shape != tl.shape
            or ti.shape[0] != N
            or ti.shape[1] > k
            or len(ex.target_logprobs) != N
            or len(ex.target_ranks) != N
        ):
            problems.append(f"{w}: shapes {ti.shape} {tl.shape} for N={N}, k={k}")
            continue
        valid = ti >= 0
        if (
            (ti[valid] >= out).any()
            or (ti[~valid] != -1).any()
            or (valid & ~np.isfinite(tl)).any()
            or (~valid & (tl != -np.inf)).any()
        ):
            problems.append(f"{w}: top-k ids out of range, or padding not (-1, -inf)")
        if np.isnan(tl).any() or (tl > 0).any() or (np.diff(tl, axis=1) > 1e-6).any():
            problems.append(f"{w}: top-k logprobs NaN, > 0 or not in rank order")
        with np.errstate(under="ignore", over="ignore"):
            if N and (np.exp(tl).sum(axis=1) > 1.02).any():
                problems.append(f"{w}: top-k mass > 1.02")
        if N and ti.shape[1] > 1:
            s = np.sort(np.where(valid, ti, -1 - np.arange(ti.shape[1])), axis=1)
            if (s[:, 1:] == s[:, :-1]).any():
                problems.append(f"{w}: an id twice in a position's top-k")
        tlp = np.asarray(ex.target_logprobs, np.float64)
        if np.isnan(tlp).any() or (tlp > 0).any() or (np.asarray(ex.target_ranks) < 1).any():
            problems.append(f"{w}: target logprob NaN/> 0 or rank < 1")
        if ex.finish_reason not in ({None} if mode == "score" else {"stop", "length"}):
            problems.append(f"{w}: finish_reason {show(ex.finish_reason, 20)} in {mode} mode")
        if not isinstance(ex.meta, dict) or _json_problem(ex.meta):
            problems.append(f"{w}: meta {_json_problem(ex.meta) or 'not an object'}")
    c = manifest["counts"]
    if len(examples) != c["examples"] or positions != c["positions"]:
        problems.append(
            f"{len(examples)} examples / {positions} positions, the manifest counts {c['examples']} / {c['positions']}"
        )
    if rejects is not None:
        rids = [r.get("id") if isinstance(r, dict) else None for r in rejects]
        if (
            len(rejects) != c["rejects"]
            or len(set(rids)) != len(rids)
            or set(rids) & ids
            or not all(
                isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("reason"), str)
                for r in rejects
            )
        ):
            problems.append("rejects: count, types, an id twice or also an example")
        else:
            tally = collections.Counter(r["reason"].split(":")[0].strip() for r in rejects)
            if dict(tally) != c.get("rejects_by_reason", dict(tally)):
                problems.append(f"rejects: reasons {dict(tally)} != counts.rejects_by_reason")
    return problems


class Expected:
    """What the pristine base caches hold, for the oracle."""

    def __init__(self, bases: dict):
        self.examples, self.rejects, self.manifests, self.tokenizers = {}, {}, {}, {}
        for base in BASES:
            self.examples[base] = sorted(canon(ex) for ex in read_examples(bases[base]))
            self.rejects[base] = canon_rejects(read_rejects(bases[base]))
            self.manifests[base] = json.loads((Path(bases[base]) / "manifest.json").read_text())
        self._tok_cache = bases["tok"]

    def tokenizer(self, base: str):
        if base not in self.tokenizers:  # transformers is imported only when needed
            from formats.tokenizer_files import load_cache_tokenizer

            tok = load_cache_tokenizer(self._tok_cache)
            self.tokenizers[base] = (tok.get_vocab(), tok.chat_template)
        return self.tokenizers[base]


def _bad_chars(text: str) -> list[str]:
    return sorted({repr(c) for c in text if c != "\n" and not c.isprintable()})


def judge_exception(exc: BaseException, info: dict, op: str, merged: str | None = None) -> dict:
    """A raised exception: a typed error naming the file or the cache is a pass; anything else is not."""
    from formats.errors import KDCacheError

    msg = str(exc)
    out = {"exc": type(exc).__name__, "message": clip(msg)}
    if isinstance(exc, MemoryError):
        return {**out, "status": "fail", "kind": "memory (MemoryError)"}
    if isinstance(exc, RecursionError):
        return {**out, "status": "fail", "kind": "untyped"}
    if not isinstance(exc, KDCacheError):
        return {**out, "status": "fail", "kind": "untyped", "trace": traceback.format_exc(limit=-4)[-1500:]}
    if not (info["cache"] in msg or any(n and n in msg for n in info["names"])):
        return {**out, "status": "fail", "kind": "typed, names neither the file nor the cache"}
    bad = _bad_chars(msg)
    if bad:
        return {**out, "status": "fail", "kind": f"typed, raw control characters in the message {' '.join(bad)[:40]}"}
    return {**out, "status": "ok", "kind": "typed"}


def compare_read_back(path, info: dict, expected: Expected, with_rejects: bool = True, what: str = "") -> dict:
    """Data read back from `path` (after an operation passed): the original's, or (lie_ok) valid."""
    base = info["base"]
    examples = read_examples(path)
    rejects = read_rejects(path) if with_rejects else None
    diff = data_difference(examples, expected.examples[base])
    if diff is None and rejects is not None and canon_rejects(rejects) != expected.rejects[base]:
        diff = f"rejects differ ({len(rejects)} read, the original has {len(expected.rejects[base])})"
    if diff is None:
        return {"status": "ok", "kind": "same data"}
    if info["lie_ok"]:
        problems = invariant_problems(examples, rejects, expected.manifests[base])
        if not problems:
            return {"status": "ok", "kind": "consistent lie (vouched-for bytes, valid data)", "detail": diff}
        return {
            "status": "fail",
            "kind": "silent: invalid data accepted",
            "detail": f"{what}{diff}; {'; '.join(problems[:3])}",
        }
    return {"status": "fail", "kind": "silent: different data accepted", "detail": what + diff}


def run_op(op: str, info: dict, expected: Expected, scratch: Path) -> dict:
    """One operation on the mutated cache, judged."""
    from formats.tools import merge_caches, summarize, verify_cache

    path = info["cache"]
    if info.get("selftest"):
        return _selftest(info["selftest"])
    if op == "tokenizer":
        from formats.tokenizer_files import load_cache_tokenizer

        try:
            tok = load_cache_tokenizer(path)
        except BaseException as exc:  # noqa: BLE001 - judged
            return judge_exception(exc, info, op)
        if (tok.get_vocab(), tok.chat_template) != expected.tokenizer(info["base"]):
            return {"status": "fail", "kind": "silent: different data accepted", "detail": "another tokenizer loaded"}
        return {"status": "ok", "kind": "same data"}
    if op == "summarize":
        try:
            text = summarize(path)
        except BaseException as exc:  # noqa: BLE001
            return judge_exception(exc, info, op)
        bad = _bad_chars(text)
        if bad:
            return {"status": "fail", "kind": "summary holds raw control characters", "detail": " ".join(bad)[:80]}
        return {"status": "ok", "kind": "printed"}
    if op == "merge":
        out = scratch / "merged"
        if out.exists():
            shutil.rmtree(out)
        try:
            merge_caches(str(out), [path])
        except BaseException as exc:  # noqa: BLE001
            return judge_exception(exc, info, op)
        try:
            return compare_read_back(out, info, expected, what="merged output: ")
        except BaseException as exc:  # noqa: BLE001 - our own merged output must read back
            return {
                "status": "fail",
                "kind": "merge output unreadable",
                "exc": type(exc).__name__,
                "message": clip(str(exc)),
            }
    try:
        if op == "read":
            examples = read_examples(path)
            diff = data_difference(examples, expected.examples[info["base"]])
            if diff is None:
                return {"status": "ok", "kind": "same data"}
            if info["lie_ok"]:
                problems = invariant_problems(examples, None, expected.manifests[info["base"]])
                if not problems:
                    return {"status": "ok", "kind": "consistent lie (vouched-for bytes, valid data)", "detail": diff}
                return {
                    "status": "fail",
                    "kind": "silent: invalid data accepted",
                    "detail": f"{diff}; {'; '.join(problems[:3])}",
                }
            return {"status": "fail", "kind": "silent: different data accepted", "detail": diff}
        verify_cache(path, check_values=(op == "verify"))
        result = compare_read_back(path, info, expected, what="verify passed; read back: ")
        if result["status"] == "ok":
            result["kind"] = "verified, " + result["kind"]
        return result
    except BaseException as exc:  # noqa: BLE001
        return judge_exception(exc, info, op)


def _selftest(what: str) -> dict:
    """What the harness must catch: a hang, a memory bomb, a crash, an untyped error, silent data."""
    if what == "hang":
        time.sleep(3600)
    if what == "memory":
        hog = bytearray(8 << 30)  # above RLIMIT_AS: MemoryError
        return {"status": "ok", "kind": f"allocated {len(hog)}"}
    if what == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if what == "untyped":
        try:
            {}["shards"]
        except KeyError as exc:
            return judge_exception(exc, {"cache": "", "names": []}, "read")
    raise ValueError(f"unknown selftest {what!r}")


# ==== the worker (one long-lived subprocess; the parent enforces the time bound) ===================


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker_main(bases_file: str, scratch: str) -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever kdcache or a library prints goes to stderr, not into the protocol

    def emit(message_type, **data):
        out.write("@@" + json.dumps({**data, "type": message_type}, default=repr) + "\n")
        out.flush()

    bases = json.loads(Path(bases_file).read_text())
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    os.chdir(scratch)
    expected = Expected(bases)
    for base in () if os.environ.get("FUZZ_LIGHT") else BASES:  # warm every path before the baseline (imports, pools)
        info = {"base": base, "cache": bases[base], "names": [], "lie_ok": False}
        for op in ops_for(base):
            r = run_op(op, info, expected, scratch)
            if r["status"] != "ok":
                emit("harness", error=f"the pristine {base} cache fails {op}: {r}")
    baseline_vm, baseline_rss = _status_kb("VmSize"), _status_kb("VmRSS")
    limit = (baseline_vm + MEM_BOUND_MB * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    emit("ready", baseline_vm_mb=baseline_vm // 1024, baseline_rss_mb=baseline_rss // 1024)
    for line in sys.stdin:
        job = json.loads(line)
        case_dir = scratch / "case"
        try:
            info = apply_case(job["case"], bases, case_dir)
        except BaseException as exc:  # noqa: BLE001 - a harness bug, reported as such
            planned = plan_case(job["case"]) if "selftest" not in job["case"] else ("plain", "selftest")
            emit(
                "case",
                info={
                    "key": case_key(job["case"]),
                    "base": planned[0],
                    "kind": planned[1],
                    "desc": f"{planned[1]} on {planned[0]} (the mutation failed)",
                    "ops": [],
                },
            )
            emit(
                "result",
                op="mutate",
                status="fail",
                kind="harness: the mutation raised",
                exc=type(exc).__name__,
                message=clip(str(exc)),
                trace=traceback.format_exc()[-1500:],
            )
            emit("done")
            continue
        emit("case", info=info)
        for op in info["ops"]:
            if op in job.get("skip", ()) or (job.get("only") and op not in job["only"]):
                continue
            emit("op", op=op)
            _reset_peak()
            t0 = time.monotonic()
            try:
                result = run_op(op, info, expected, case_dir)
            except BaseException as exc:  # noqa: BLE001 - e.g. MemoryError inside the judging
                result = {
                    "status": "fail",
                    "kind": "memory (MemoryError)" if isinstance(exc, MemoryError) else "harness",
                    "exc": type(exc).__name__,
                    "message": clip(str(exc)),
                }
            seconds = time.monotonic() - t0
            peak_mb = (_status_kb("VmHWM") - baseline_rss) // 1024
            if peak_mb > MEM_BOUND_MB:
                result = {**result, "status": "fail", "kind": f"memory ({peak_mb} MB above baseline)"}
            emit("result", op=op, seconds=round(seconds, 3), peak_mb=peak_mb, **result)
        shutil.rmtree(case_dir, ignore_errors=True)
        emit("done")


# ==== the parent: a pool of workers, each case's operations timed ==================================


class _Worker:
    def __init__(self, pool: Pool, n: int):
        self.pool, self.n = pool, n
        self.scratch = Path(pool.scratch) / f"w{n}"
        self.stderr_path = Path(pool.scratch) / f"w{n}.stderr"
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "MALLOC_ARENA_MAX": "2",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "FUZZ_TIMEOUT": str(pool.timeout),
            "FUZZ_MEM_MB": str(pool.mem_mb),
        }
        if pool.light:
            env["FUZZ_LIGHT"] = "1"
        self.stderr = open(self.stderr_path, "ab")  # noqa: SIM115 - open for the worker's lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.formats.cache_mutations", "--worker", pool.bases_file, str(self.scratch)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            start_new_session=True,
        )
        self.buf = b""
        self.ready = False
        self.job: dict | None = None  # {"case", "skip"}
        self.info: dict | None = None
        self.op: str | None = None
        self.deadline = time.monotonic() + pool.start_timeout

    def send(self, job: dict):
        self.job, self.info, self.op = job, None, None
        self.deadline = time.monotonic() + self.pool.timeout
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.stderr.close()

    def stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_bytes()[-600:].decode(errors="replace")
        except OSError:
            return ""


class Pool:
    """Run cases on `workers` worker subprocesses. Each operation of a case must report within `timeout`
    seconds; a worker that does not (a hang) or dies (a crash) is killed and restarted, and the case
    goes on with its remaining operations in the new worker."""

    def __init__(
        self,
        bases: dict,
        *,
        workers: int = 2,
        timeout: float = TIME_BOUND,
        mem_mb: int = MEM_BOUND_MB,
        scratch: str | None = None,
        start_timeout: float = 180.0,
        light: bool = False,
    ):
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.scratch = scratch or tempfile.mkdtemp(prefix="kdcache-fuzz-", dir=shm)
        self.bases_file = str(Path(self.scratch) / "bases.json")
        Path(self.bases_file).write_text(json.dumps(bases))
        self.n_workers, self.timeout, self.mem_mb, self.start_timeout = workers, timeout, mem_mb, start_timeout
        self.light = light  # no warm-up (the harness's self-tests)
        self.harness_errors: list[str] = []
        self.workers: list[_Worker] = []

    def close(self):
        for w in self.workers:
            w.kill()
        self.workers = []
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, cases: list[dict], progress=None) -> list[dict]:
        """Every case's record: {"case", "info", "results": [{"op", "status", "kind", ...}]}, in order."""
        records = {case_key(c): {"case": c, "info": None, "results": []} for c in cases}
        pending = collections.deque({"case": c, "skip": []} for c in cases)
        if not self.workers:
            self.workers = [_Worker(self, n) for n in range(self.n_workers)]
        done = 0
        while pending or any(w.job for w in self.workers):
            for i, w in enumerate(self.workers):
                if w.proc.poll() is not None and not w.job and w.ready:  # died while idle
                    self.workers[i] = _Worker(self, w.n)
            for w in self.workers:
                if w.ready and not w.job and pending:
                    w.send(pending.popleft())
            live = [w for w in self.workers if w.job or not w.ready]
            if not live:
                continue
            wait = max(0.0, min(w.deadline for w in live) - time.monotonic())
            readable, _, _ = select.select([w.proc.stdout for w in live], [], [], wait)
            now = time.monotonic()
            for w in list(live):
                if w.proc.stdout in readable:
                    chunk = os.read(w.proc.stdout.fileno(), 1 << 16)
                    if not chunk:
                        if not w.ready:
                            raise RuntimeError(
                                f"a fuzz worker died while starting (exit {w.proc.wait()}): {w.stderr_tail()}"
                            )
                        done += self._lost(
                            w, records, pending, "crash", f"the worker died (exit {w.proc.wait()}): {w.stderr_tail()}"
                        )
                        continue
                    w.buf += chunk
                    while b"\n" in w.buf:
                        line, w.buf = w.buf.split(b"\n", 1)
                        if line.startswith(b"@@") and self._message(w, json.loads(line[2:]), records):
                            done += 1
                            if progress:
                                progress(done, len(cases))
                elif now >= w.deadline:
                    if not w.ready:
                        raise RuntimeError(f"a fuzz worker did not start in {self.start_timeout} s: {w.stderr_tail()}")
                    done += self._lost(w, records, pending, "hang", f"no result after {self.timeout} s (killed)")
        return [records[case_key(c)] for c in cases]

    def _message(self, w: _Worker, msg: dict, records: dict) -> bool:
        kind = msg["type"]
        if kind == "ready":
            w.ready, w.deadline = True, float("inf")
            return False
        if kind == "harness":
            self.harness_errors.append(msg["error"])
            return False
        rec = records[case_key(w.job["case"])]
        w.deadline = time.monotonic() + self.timeout
        if kind == "case":
            w.info = msg["info"]
            rec["info"] = rec["info"] or msg["info"]
        elif kind == "op":
            w.op = msg["op"]
        elif kind == "result":
            rec["results"].append({k: v for k, v in msg.items() if k != "type"})
            w.op = None
        elif kind == "done":
            w.job, w.deadline = None, float("inf")
            return True
        return False

    def _lost(self, w: _Worker, records: dict, pending, kind: str, detail: str) -> int:
        """A worker hung or died on its current operation: record it, restart, go on with the case."""
        job = w.job
        w.kill()
        self.workers[self.workers.index(w)] = _Worker(self, w.n)
        if job is None:
            return 0
        rec = records[case_key(job["case"])]
        op = w.op or ("mutate" if w.info is None else None)
        losses = job.get("losses", 0) + 1
        if op is None:  # between operations: nothing lost but the worker (give up after 3 such losses)
            ran = {r["op"] for r in rec["results"]}
            if losses >= 3:
                rec["results"].append({"op": "between-ops", "status": "fail", "kind": kind, "detail": clip(detail)})
                return 1
            pending.appendleft({"case": job["case"], "skip": sorted(ran), "losses": losses})
            return 0
        rec["results"].append({"op": op, "status": "fail", "kind": kind, "detail": clip(detail)})
        if op == "mutate":
            return 1
        ran = {r["op"] for r in rec["results"]}
        remaining = [o for o in (w.info or {}).get("ops", []) if o not in ran]
        if remaining:
            pending.appendleft({"case": job["case"], "skip": sorted(ran), "losses": losses})
            return 0
        return 1


# ==== reports ======================================================================================


def failures(records: list[dict]) -> list[tuple[dict, dict]]:
    return [(rec, r) for rec in records for r in rec["results"] if r["status"] != "ok"]


def group_of(rec: dict, r: dict) -> tuple[str, str, str]:
    info = rec["info"] or {}
    what = r["kind"]
    if what == "untyped" or what.startswith("merge output"):
        what = f"{what} {r.get('exc')}"
    return (info.get("kind", "?"), r["op"], what)


def repro(rec: dict, r: dict | None = None) -> str:
    op = f" --op {r['op']}" if r and r["op"] in OPS else ""
    return f"python -m tests.formats.cache_mutations {case_key(rec['case'])}{op}"


def describe(rec: dict, r: dict) -> str:
    info = rec["info"] or {}
    tail = r.get("message") or r.get("detail") or ""
    exc = f"{r.get('exc')}: " if r.get("exc") else ""
    return (
        f"[{case_key(rec['case'])}] {info.get('desc', '?')} | op {r['op']} -> {r['kind']}: {exc}{clip(tail, 220)}"
        f"\n    repro: {repro(rec, r)}"
    )


def report(records: list[dict], limit: int = 20) -> str:
    fails = failures(records)
    groups = collections.Counter(group_of(rec, r) for rec, r in fails)
    lies = sum(1 for rec in records for r in rec["results"] if r["kind"].endswith("valid data)"))
    lines = [
        (
            f"{len({case_key(rec['case']) for rec, _ in fails})} of {len(records)} cases fail ({len(fails)} operations; "
            f"{lies} operations read a consistent lie, accepted)"
        )
    ]
    if fails:
        lines.append("failures by (mutation, operation, outcome):")
        lines += [f"  {n:5d}  {k:<17} {op:<17} {what}" for (k, op, what), n in groups.most_common()]
        lines.append(f"first {min(limit, len(fails))}:")
        lines += [describe(rec, r) for rec, r in fails[:limit]]
    return "\n".join(lines)


# ==== command line: reproduce one case in this process, or run many through workers ================


def _run_inline(case: dict, op_filter: str | None, keep: str | None) -> int:
    with tempfile.TemporaryDirectory(prefix="kdcache-fuzz-") as tmp:
        print("building the base caches ...", file=sys.stderr)
        bases = build_caches(Path(tmp) / "bases")
        expected = Expected(bases)
        case_dir = Path(keep) if keep else Path(tmp) / "case"
        info = apply_case(case, bases, case_dir)
        expected.tokenizer("tok")  # imported before the memory bound, as a worker does
        limit = (_status_kb("VmSize") + MEM_BOUND_MB * 1024) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        print(
            f"case {info['key']}: {info['desc']}\n  offending names {info['names']}, lie_ok {info['lie_ok']}\n"
            f"  mutated cache: {info['cache']}"
        )
        failed = 0
        for op in info["ops"]:
            if op_filter and op != op_filter:
                continue

            def expire(*_, op=op):
                raise TimeoutError(f"{op}: no result after {TIME_BOUND} s (a hang)")

            signal.signal(signal.SIGALRM, expire)
            signal.alarm(int(TIME_BOUND))
            t0 = time.monotonic()
            try:
                result = run_op(op, info, expected, case_dir)
            except TimeoutError as exc:
                result = {"status": "fail", "kind": "hang", "message": str(exc)}
            finally:
                signal.alarm(0)
            failed += result["status"] != "ok"
            extra = {k: v for k, v in result.items() if k not in ("status", "kind", "trace")}
            print(f"  {op:<17} {result['status']:<4} {result['kind']}  {time.monotonic() - t0:.2f} s  {extra}")
            if result.get("trace"):
                print("    " + result["trace"].replace("\n", "\n    "))
        if keep:
            print(f"kept: {case_dir}")
        return 1 if failed else 0


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.formats.cache_mutations", description=__doc__.split("\n\n")[0])
    p.add_argument("case", nargs="?", help="SEED:INDEX or a regression case name")
    p.add_argument("--op", choices=OPS, help="run only this operation")
    p.add_argument("--keep", help="write the mutated case to this folder and leave it there")
    p.add_argument("--summary", help="N[:SEED]: run cases 0..N-1 of SEED through worker subprocesses; print the table")
    p.add_argument("--regressions", action="store_true", help="run every regression case through workers")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--show", type=int, default=20, help="failures listed in full")
    p.add_argument("--json", help="write every case's record to this file")
    p.add_argument("--worker", nargs=2, metavar=("BASES_JSON", "SCRATCH"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker_main(*a.worker)
        return 0
    if a.summary or a.regressions:
        cases = [{"name": n} for n in REGRESSION] if a.regressions else []
        if a.summary:
            n, _, seed = a.summary.partition(":")
            cases += [{"seed": int(seed or 0), "index": i} for i in range(int(n))]
        with tempfile.TemporaryDirectory(prefix="kdcache-fuzz-bases-") as tmp:
            bases = build_caches(tmp)
            t0 = time.monotonic()
            with Pool(bases, workers=a.workers) as pool:
                records = pool.run(cases, progress=lambda d, n: d % 100 or print(f"{d}/{n}", file=sys.stderr))
            print(f"\n{len(cases)} cases in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        if a.json:
            Path(a.json).write_text(json.dumps(records, default=repr))
        print(report(records, a.show))
        for error in pool.harness_errors:
            print(f"HARNESS: {error}")
        return 1 if failures(records) or pool.harness_errors else 0
    if not a.case:
        p.error("give a case (SEED:INDEX or a regression name), --summary N[:SEED] or --regressions")
    return _run_inline(parse_case(a.case), a.op, a.keep)


if __name__ == "__main__":
    sys.exit(main())
