"""verify, inspect, merge: what people run on a cache they were handed."""
from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from formats.card import write_card
from formats.errors import ChecksumError, FormatError, IncompatibleCachesError, InputError
from formats.manifest import load_manifest, now_iso, open_cache, sha256_file, write_json_atomic
from formats.schema import MANIFEST_NAME, REJECTS_NAME, read_shard_metadata
from formats.shard import decode_table
from formats.writer import check_accounting

# Caches are compatible when these agree (merge refuses otherwise; the trainer mixes only these).
COMPAT_KEYS = [("format_version",), ("codec",), ("mode",), ("teacher", "name_or_path"), ("teacher", "revision"),
               ("teacher", "dtype"), ("tokenizer", "fingerprint"), ("tokenizer", "chat_template_sha256")]
MASS_SLACK = 0.02  # quantization (<0.016 nat per entry) can lift a full top-k's mass slightly above 1


def _get(d: dict, path: tuple):
    for key in path:
        d = (d or {}).get(key)
    return d


# ---- verify ---------------------------------------------------------------------------------

def verify_cache(path, *, check_values: bool = True, progress=None, storage_options: dict | None = None) -> dict:
    """Check checksums, schema and values of every shard. Raises FormatError naming shard and row."""
    fs, root = open_cache(path, storage_options)
    manifest = load_manifest(path, storage_options)
    check_accounting(manifest, posixpath.join(root, MANIFEST_NAME))
    vocab = _get(manifest, ("tokenizer", "vocab_size"))
    k = manifest["codec"]["k"]
    rows = positions = 0
    for shard in manifest["shards"]:
        where = posixpath.join(root, shard["file"])
        if not fs.exists(where):
            raise FormatError(f"{where}: missing (listed in the manifest); restore the file or re-run the job that wrote it")
        size = fs.size(where)
        if size != shard["bytes"]:
            raise ChecksumError(f"{where}: {size} bytes, the manifest says {shard['bytes']} (truncated or replaced); "
                                "restore it from the source")
        digest = sha256_file(where, fs)
        if digest != shard["sha256"]:
            raise ChecksumError(f"{where}: sha256 {digest[:16]}... differs from the manifest's {shard['sha256'][:16]}... "
                                "(corrupted); restore it from the source")
        try:
            pf = pq.ParquetFile(fs.open(where, "rb"))
        except Exception as exc:
            raise FormatError(f"{where}: not a readable Parquet file ({exc})") from None
        meta = read_shard_metadata(pf.schema_arrow, where)
        if pf.metadata.num_rows != shard["rows"]:
            raise FormatError(f"{where}: {pf.metadata.num_rows} rows, the manifest says {shard['rows']}")
        shard_rows = shard_positions = 0
        for g in range(pf.metadata.num_row_groups):
            examples = decode_table(pf.read_row_group(g), meta, f"{where}, row group {g}")
            for i, ex in enumerate(examples):
                if check_values:
                    _check_values(ex, vocab, k, f"{where}, row {shard_rows + i} (id {ex.id!r})")
                shard_positions += ex.num_targets
            shard_rows += len(examples)
        if shard_positions != shard["positions"]:
            raise FormatError(f"{where}: {shard_positions} positions, the manifest says {shard['positions']}")
        rows += shard_rows
        positions += shard_positions
        if progress:
            progress(shard["file"])
    counts = manifest["counts"]
    if rows != counts.get("examples") or positions != counts.get("positions"):
        raise FormatError(f"{path}: shards hold {rows} examples / {positions} positions, the manifest counts "
                          f"{counts.get('examples')} / {counts.get('positions')}")
    rej = manifest.get("rejects_file")
    if rej:
        rpath = posixpath.join(root, rej["file"])
        if not fs.exists(rpath) or sha256_file(rpath, fs) != rej["sha256"]:
            raise ChecksumError(f"{rpath}: missing or its sha256 differs from the manifest")
    return {"shards": len(manifest["shards"]), "examples": rows, "positions": positions}


def _check_values(ex, vocab, k, where: str) -> None:
    ids, lps = ex.topk_ids, ex.topk_logprobs
    valid = ids >= 0
    if ids.shape[1] > k:
        raise FormatError(f"{where}: {ids.shape[1]} entries per position, k is {k}")
    if vocab is not None and (ids >= vocab).any():
        raise FormatError(f"{where}: token id {int(ids.max())} >= vocab size {vocab}")
    if (ex.input_ids < 0).any() or (vocab is not None and (ex.input_ids >= vocab).any()):
        raise FormatError(f"{where}: input_ids outside 0..{vocab}")
    if (lps[valid] > 0).any():
        raise FormatError(f"{where}: a logprob is > 0")
    if ids.shape[1] > 1 and (np.diff(np.where(valid, lps, -np.inf), axis=1)[valid[:, 1:]] > 0).any():
        raise FormatError(f"{where}: logprobs not in rank order")
    mass = np.exp(np.where(valid, lps, -np.inf).astype(np.float64)).sum(axis=1)
    if (mass > 1 + MASS_SLACK).any():
        raise FormatError(f"{where}: top-k mass {float(mass.max()):.4f} > 1")
    if (ex.target_ranks < 1).any() or (ex.target_logprobs > 0).any():
        raise FormatError(f"{where}: actual-token rank < 1 or logprob > 0")
    for r in range(ids.shape[0]):
        row = ids[r][valid[r]]
        if len(np.unique(row)) != len(row):
            raise FormatError(f"{where}, position {int(ex.target_positions[r])}: a token id is listed twice in the top-k")


# ---- inspect --------------------------------------------------------------------------------

def summarize(path) -> str:
    m = load_manifest(path)
    c, t, tok, d = m["counts"], m.get("teacher", {}), m.get("tokenizer", {}), m.get("dataset", {})
    rows = [
        ("format", f"v{m['format_version']}, codec {m['codec']['name']} k={m['codec']['k']} mass={m['codec'].get('mass')}"),
        ("mode", m.get("mode")),
        ("teacher", f"{t.get('name_or_path')} ({t.get('engine')} {t.get('engine_version', '')}, {t.get('dtype')})"),
        ("tokenizer", f"{tok.get('name_or_path')} vocab={tok.get('vocab_size')} fingerprint={str(tok.get('fingerprint'))[:16]}"),
        ("dataset", f"{d.get('name')} split={d.get('split')} filters={d.get('filters')}"),
        ("examples", c.get("examples")), ("positions", c.get("positions")),
        ("rejects", f"{c.get('rejects')} {c.get('rejects_by_reason') or ''}"),
        ("shards", len(m["shards"])), ("bytes", c.get("bytes")),
        ("bytes/position", f"{c.get('bytes_per_position', 0):.1f}"),
        ("created", m.get("created")), ("command", m.get("command")),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def show_example(path, example_id: str, tokenizer=None, top: int = 5, max_positions: int = 40) -> str:
    from formats.reader import CacheReader

    for ex in CacheReader(path, prefetch=0):
        if ex.id == example_id:
            break
    else:
        raise InputError(f"no example with id {example_id!r} in {path}")
    dec = (lambda ids: tokenizer.decode(ids)) if tokenizer else (lambda ids: " ".join(map(str, ids)))
    lines = [f"id {ex.id}  source {ex.source}  tokens {len(ex.input_ids)}  trained positions {ex.num_targets}"
             + (f"  finish {ex.finish_reason}" if ex.finish_reason else ""), "", dec(ex.input_ids.tolist()), "",
             f"{'pos':>5}  {'token':<16} {'logp':>7} {'rank':>5}  teacher top-{top}"]
    for n, t in enumerate(ex.target_positions[:max_positions]):
        tops = ", ".join(f"{dec([int(i)])!r}:{np.exp(lp):.2f}" for i, lp in zip(ex.topk_ids[n, :top], ex.topk_logprobs[n, :top]) if i >= 0)
        lines.append(f"{int(t):>5}  {dec([int(ex.input_ids[t])])!r:<16} {ex.target_logprobs[n]:>7.2f} {int(ex.target_ranks[n]):>5}  {tops}")
    if ex.num_targets > max_positions:
        lines.append(f"... {ex.num_targets - max_positions} more positions")
    return "\n".join(lines)


# ---- merge ----------------------------------------------------------------------------------

def check_compatible(manifests: list[dict], names: list[str]) -> None:
    first = manifests[0]
    for m, name in zip(manifests[1:], names[1:]):
        for key in COMPAT_KEYS:
            if _get(first, key) != _get(m, key):
                raise IncompatibleCachesError(
                    f"{name} does not belong with {names[0]}: {'.'.join(key)} differs "
                    f"({_get(m, key)!r} vs {_get(first, key)!r}); only caches from the same teacher, tokenizer, "
                    "template and codec can be merged")


def merge_caches(out, caches: list) -> dict:
    """Combine worker caches into one folder `out` (copies shards; inputs are left untouched)."""
    if not caches:
        raise InputError("merge needs at least one cache")
    out = Path(out)
    if (out / MANIFEST_NAME).exists() or (out.exists() and any(out.iterdir())):
        raise InputError(f"{out} exists and is not empty; merge writes a new folder")
    manifests = [load_manifest(c) for c in caches]
    names = [str(c) for c in caches]
    check_compatible(manifests, names)
    seen: dict[str, str] = {}
    for c, m in zip(caches, manifests):
        fs, root = open_cache(c)
        for shard in m["shards"]:
            pf = pq.ParquetFile(fs.open(posixpath.join(root, shard["file"]), "rb"))
            for ex_id in pf.read(columns=["id"]).column("id").to_pylist():
                if ex_id in seen:
                    raise IncompatibleCachesError(f"example {ex_id!r} is in both {seen[ex_id]} and {c}: these caches overlap "
                                                  "(the same worker slice twice?); merge disjoint caches only")
                seen[ex_id] = str(c)
    out.mkdir(parents=True, exist_ok=True)
    shards, rejects = [], []
    for w, (c, m) in enumerate(zip(caches, manifests)):
        fs, root = open_cache(c)
        for shard in m["shards"]:
            name = f"w{w:03d}-{shard['file']}"
            tmp = out / f".{name}.tmp"
            fs.get(posixpath.join(root, shard["file"]), str(tmp))
            if sha256_file(tmp) != shard["sha256"]:
                tmp.unlink()
                raise ChecksumError(f"{c}/{shard['file']}: sha256 differs from its manifest; run `kdcache verify {c}`")
            os.replace(tmp, out / name)
            shards.append({**shard, "file": name})
        rpath = posixpath.join(root, (m.get("rejects_file") or {}).get("file", REJECTS_NAME))
        if fs.exists(rpath):
            with fs.open(rpath, "r") as f:
                rejects += [json.loads(line) for line in f if line.strip()]
    with open(out / REJECTS_NAME, "w") as f:
        for r in rejects:
            f.write(json.dumps(r) + "\n")
    merged = dict(manifests[0])
    merged["created"] = now_iso()
    merged["shards"] = shards
    merged["merged_from"] = [{"path": str(c), "created": m.get("created"), "dataset": m.get("dataset"),
                              "examples": m["counts"].get("examples")} for c, m in zip(caches, manifests)]
    by_reason: dict[str, int] = {}
    for m in manifests:
        for reason, n in (m["counts"].get("rejects_by_reason") or {}).items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    merged["counts"] = {
        "examples": sum(s["rows"] for s in shards), "positions": sum(s["positions"] for s in shards),
        "rejects": len(rejects), "rejects_by_reason": by_reason, "bytes": sum(s["bytes"] for s in shards),
    }
    merged["counts"]["bytes_per_position"] = merged["counts"]["bytes"] / max(1, merged["counts"]["positions"])
    merged["rejects_file"] = {"file": REJECTS_NAME, "count": len(rejects), "sha256": sha256_file(out / REJECTS_NAME)}
    write_card(out, merged)
    write_json_atomic(out / MANIFEST_NAME, merged)
    return merged
