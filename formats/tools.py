"""verify, inspect, merge: what people run on a cache they were handed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from formats.card import write_card
from formats.errors import FormatError, IncompatibleCachesError, InputError
from formats.manifest import command_line, load_manifest, manifest_get, now_iso, open_cache, tally_reasons
from formats.safe_write import AtomicFile, make_folder, write_json_atomic
from formats.schema import CARD_NAME, MANIFEST_NAME, REJECTS_NAME, SHARD_SUFFIX
from formats.shard import ShardFile
from formats.tokenizer_files import (
    TOKENIZER_DIR,
    check_tokenizer_identity,
    copy_tokenizer_files,
    verify_tokenizer_files,
)
from formats.trust import loads, printable

# Caches are compatible when these agree (merge refuses otherwise; the trainer mixes only these).
COMPAT_KEYS = [
    ("format_version",),
    ("codec",),
    ("mode",),
    ("teacher", "name_or_path"),
    ("teacher", "revision"),
    ("teacher", "dtype"),
    ("tokenizer", "fingerprint"),
    ("tokenizer", "chat_template_sha256"),
]


# ---- verify ---------------------------------------------------------------------------------
# docs/FORMAT.md ("What `kdcache verify` checks") lists these checks; keep the two in sync.


def verify_cache(path, *, check_values: bool = True, progress=None, storage_options: dict | None = None) -> dict:
    """Check a cache end to end; raises FormatError / ChecksumError naming the file, row and field.

    What the folder holds (only plain files, no links, FIFOs or devices; no unlisted shard), the
    manifest (types, names, no duplicate shard entries), every shard (size, sha256, metadata, codec,
    settings, rows, positions, target spans), example ids unique across the cache, every value (with
    check_values), the counts, the rejects file, the tokenizer files and the tokenizer they load.
    Returns counts and `unlisted`: files the manifest does not list that no kdcache reader opens.
    """
    files = open_cache(path, storage_options)
    manifest = load_manifest(files)
    mpath = files.where(MANIFEST_NAME)  # messages about what the manifest claims name it
    unlisted = check_contents(files, manifest)
    owner: dict[str, str] = {}  # example id -> the shard that holds it
    rows = positions = 0
    for i, entry in enumerate(manifest["shards"]):
        shard = ShardFile(files, manifest, i, hash_first=True)
        try:
            shard_rows = shard_positions = 0
            for g in range(shard.num_row_groups):
                examples = shard.examples(g)
                for j, ex in enumerate(examples):
                    row = f"{shard.where}, row {shard_rows + j} (id {ex.id!r:.200})"
                    if ex.id in owner:
                        raise FormatError(
                            f"{row}: example id {ex.id!r:.200} is also in {owner[ex.id]}; every example "
                            "must be in a cache once (a duplicated or copied shard?)"
                        )
                    owner[ex.id] = entry["file"]
                    if check_values:
                        _check_values(ex, row)
                    shard_positions += ex.num_targets
                shard_rows += len(examples)
        finally:
            shard.close()
        if shard_positions != entry["positions"]:
            raise FormatError(f"{shard.where}: {shard_positions} positions, the manifest says {entry['positions']}")
        rows += shard_rows
        positions += shard_positions
        if progress:
            progress(entry["file"])
    counts = manifest["counts"]
    if rows != counts.get("examples") or positions != counts.get("positions"):
        raise FormatError(
            f"{mpath}: shards hold {rows} examples / {positions} positions, the manifest counts "
            f"{counts.get('examples')} / {counts.get('positions')}"
        )
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    if counts.get("bytes", total_bytes) != total_bytes:
        raise FormatError(
            f"{mpath}: shards hold {total_bytes} bytes, the manifest's counts.bytes says {counts['bytes']}"
        )
    rejects = read_rejects(files, manifest)
    rejects_name = (manifest.get("rejects_file") or {}).get("file", REJECTS_NAME)
    _check_rejects(rejects, manifest, owner, files.where(rejects_name))
    tokenizer_files = verify_tokenizer_files(files, manifest)
    if tokenizer_files:
        check_tokenizer_identity(files, manifest)
    return {
        "shards": len(manifest["shards"]),
        "examples": rows,
        "positions": positions,
        "rejects": len(rejects),
        "tokenizer_files": tokenizer_files,
        "unlisted": unlisted,
    }


# Files a cache folder may hold that its manifest does not list (nothing kdcache reads opens them):
# the card, and what a hub download leaves (.gitattributes, huggingface_hub's .cache/ folder).
KNOWN_UNLISTED = {CARD_NAME, ".gitattributes"}
KNOWN_UNLISTED_DIRS = (".cache/",)


def listed_files(manifest: dict) -> list[str]:
    """Every file a (checked) manifest accounts for, as '/'-joined names in the cache folder, in the order
    a copy writes them: the shards, the rejects file, the tokenizer files, manifest.json last."""
    names = [s["file"] for s in manifest["shards"]]
    if manifest.get("rejects_file"):
        names.append(manifest["rejects_file"]["file"])
    names += [f"{TOKENIZER_DIR}/{e['file']}" for e in manifest.get("tokenizer_files") or []]
    return [*names, MANIFEST_NAME]


def check_contents(files, manifest: dict) -> list[str]:
    """Every entry of the cache folder is a plain file or folder (FormatError naming a symlink, FIFO,
    device or socket anywhere in it), and every `*.parquet` file is a listed shard (an unlisted one
    would be loaded by the card's `data_files: "*.parquet"` and by ordinary Parquet tools). Returns
    the other files the manifest does not list (outside the card, .gitattributes and .cache/)."""
    listed = set(listed_files(manifest))
    unlisted = []
    for rel, kind in files.walk():
        if kind not in ("file", "dir"):
            raise FormatError(
                f"{printable(files.where(rel))}: a {'symlink' if kind == 'link' else 'FIFO, device or socket'} "
                "inside the cache; a cache holds only plain files and folders: remove it (or restore the "
                "cache from its source)"
            )
        if kind == "dir" or rel in listed:
            continue
        if rel.endswith(SHARD_SUFFIX) and not rel.startswith(KNOWN_UNLISTED_DIRS):
            raise FormatError(
                f"{printable(files.where(rel))}: a Parquet file the manifest does not list; ordinary "
                "tools (and the card's data_files) would load its rows with the cache's: remove it, or "
                "merge it properly (`kdcache merge`)"
            )
        if rel not in KNOWN_UNLISTED and not rel.startswith(KNOWN_UNLISTED_DIRS):
            unlisted.append(rel)
    return unlisted


MAX_REJECTS_BYTES = 4 << 30  # the rejects file (a reject line is ~100 bytes)
MAX_REJECT_LINE = 1 << 16


def read_rejects(files, manifest: dict) -> list[dict]:
    """The records of a cache's rejects file, after checking its sha256; [] for a cache without one.

    Each line must be a strict-JSON object with a string `id` and `reason`; FormatError names the line.
    """
    files = open_cache(files)
    rej = manifest.get("rejects_file")
    if rej is None:
        if manifest["counts"].get("rejects"):
            raise FormatError(
                f"{files.where(MANIFEST_NAME)}: counts {manifest['counts']['rejects']} rejects but names "
                "no rejects_file"
            )
        return []
    rpath = files.where(rej["file"])
    cap = min(MAX_REJECTS_BYTES, (rej["count"] + 1) * MAX_REJECT_LINE)
    data = files.read_bytes(rej["file"], max_bytes=cap, sha256=rej["sha256"], listed_in="rejects_file in the manifest")
    records = []
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        if len(records) >= rej["count"]:
            raise FormatError(f"{rpath}, line {n}: more rejects than the manifest's rejects_file.count {rej['count']}")
        r = loads(line, f"{rpath}, line {n}", max_bytes=MAX_REJECT_LINE, what="a reject")
        if not (isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("reason"), str)):
            raise FormatError(f"{rpath}, line {n}: a reject is an object with string id and reason")
        records.append(r)
    return records


def _check_rejects(rejects: list[dict], manifest: dict, example_owner: dict, path) -> None:
    """Rejects: as many as counted, ids unique and never also an example, reasons as tallied."""
    counts, declared = manifest["counts"], (manifest.get("rejects_file") or {}).get("count", len(rejects))
    if not len(rejects) == declared == counts.get("rejects", len(rejects)):
        raise FormatError(
            f"{path}: the rejects file holds {len(rejects)} rejects, the manifest says "
            f"{declared} (rejects_file.count) and {counts.get('rejects')} (counts.rejects)"
        )
    seen: set[str] = set()
    for r in rejects:
        if r["id"] in seen or r["id"] in example_owner:
            where = "twice in the rejects" if r["id"] in seen else f"also an example (in {example_owner[r['id']]})"
            raise FormatError(
                f"{path}: rejected record {r['id']!r} is {where}; every input record is written or rejected, once"
            )
        seen.add(r["id"])
    tally = tally_reasons(rejects)
    if "rejects_by_reason" in counts and counts["rejects_by_reason"] != tally:
        raise FormatError(
            f"{path}: counts.rejects_by_reason {counts['rejects_by_reason']} does not match the rejects "
            f"file's reasons {tally}"
        )


def _check_values(ex, where: str) -> None:
    """What every reader does not check (formats.shard checks the ids' ranges, the mass and the ranks):
    no id twice in a position's top-k."""
    ids = ex.topk_ids
    if ids.shape[1] > 1:
        s = np.sort(ids, axis=1)
        dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
        if dup.any():
            r = int(np.flatnonzero(dup.any(axis=1))[0])
            raise FormatError(
                f"{where}, position {int(ex.target_positions[r])}: a token id is listed twice in the top-k"
            )


# ---- inspect --------------------------------------------------------------------------------


def summarize(path) -> str:
    m = load_manifest(path)
    c, t, tok, d = m["counts"], m.get("teacher", {}), m.get("tokenizer", {}), m.get("dataset", {})
    rows = [
        (
            "format",
            f"v{m['format_version']}, codec {m['codec']['name']} k={m['codec']['k']} mass={m['codec'].get('mass')}",
        ),
        ("mode", m.get("mode")),
        ("teacher", f"{t.get('name_or_path')} ({t.get('engine')} {t.get('engine_version', '')}, {t.get('dtype')})"),
        (
            "tokenizer",
            f"{tok.get('name_or_path')} vocab={tok.get('vocab_size')} fingerprint={str(tok.get('fingerprint'))[:16]}",
        ),
        (
            "tokenizer files",
            f"{len(m['tokenizer_files'])} in tokenizer/"
            if m.get("tokenizer_files")
            else "none (a student with another tokenizer needs them: kdcache add-tokenizer)",
        ),
        ("dataset", f"{d.get('name')} split={d.get('split')} filters={d.get('filters')}"),
        ("examples", c.get("examples")),
        ("positions", c.get("positions")),
        ("rejects", f"{c.get('rejects')} {c.get('rejects_by_reason') or ''}"),
        ("shards", len(m["shards"])),
        ("bytes", c.get("bytes")),
        ("bytes/position", f"{c.get('bytes_per_position', 0):.1f}"),
        ("created", m.get("created")),
        ("command", m.get("command")),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {printable(value)}" for name, value in rows)  # a cache's text is escaped


def show_example(path, example_id: str, tokenizer=None, top: int = 5, max_positions: int = 40) -> str:
    from formats.reader import CacheReader

    for ex in CacheReader(path, prefetch=0):
        if ex.id == example_id:
            break
    else:
        raise InputError(f"no example with id {example_id!r} in {printable(str(path))}")
    dec = (lambda ids: tokenizer.decode(ids)) if tokenizer else (lambda ids: " ".join(map(str, ids)))
    lines = [
        printable(
            f"id {ex.id}  source {ex.source}  tokens {len(ex.input_ids)}  trained positions {ex.num_targets}"
            + (f"  finish {ex.finish_reason}" if ex.finish_reason else "")
        ),
        "",
        printable(dec(ex.input_ids.tolist()), newlines=True),
        "",
        f"{'pos':>5}  {'token':<16} {'logp':>7} {'rank':>5}  teacher top-{top}",
    ]
    for n, t in enumerate(ex.target_positions[:max_positions]):
        tops = ", ".join(
            f"{dec([int(i)])!r}:{np.exp(lp):.2f}"
            for i, lp in zip(ex.topk_ids[n, :top], ex.topk_logprobs[n, :top])
            if i >= 0
        )
        lines.append(
            f"{int(t):>5}  {dec([int(ex.input_ids[t])])!r:<16} {ex.target_logprobs[n]:>7.2f} {int(ex.target_ranks[n]):>5}  {tops}"
        )
    if ex.num_targets > max_positions:
        lines.append(f"... {ex.num_targets - max_positions} more positions")
    return "\n".join(lines)


# ---- merge ----------------------------------------------------------------------------------

# Besides COMPAT_KEYS, worker caches of one job agree on every setting that changes their rows: the
# dataset and its filters (all but the worker's own slice), templating and sampling, the sizes.
ROW_SETTINGS = [
    ("dataset",),
    ("extra", "template"),
    ("extra", "sampling"),
    ("tokenizer", "vocab_size"),
    ("teacher", "output_size"),
]
PER_WORKER = {("dataset", "filters", "worker_index")}


def check_mergeable(manifests: list[dict], names: list[str]) -> None:
    first = manifests[0]
    for m, name in zip(manifests[1:], names[1:]):
        diffs = [key for key in COMPAT_KEYS if manifest_get(first, key) != manifest_get(m, key)]
        for key in ROW_SETTINGS:
            diffs += [
                d for d in _differences(manifest_get(first, key), manifest_get(m, key), key) if d not in PER_WORKER
            ]
        if diffs and diffs[0] == ("format_version",):
            raise IncompatibleCachesError(
                f"{name} does not belong with {names[0]}: format version {m['format_version']} vs "
                f"{first['format_version']}; merge caches of one format version (re-create the older cache with "
                "this kdcache to merge it with newer ones)"
            )
        if diffs:
            key = diffs[0]
            raise IncompatibleCachesError(
                f"{name} does not belong with {names[0]}: {'.'.join(key)} differs "
                f"({manifest_get(m, key)!r} vs {manifest_get(first, key)!r}); only caches from the same teacher, tokenizer, template, "
                "codec, dataset and filters (worker slices of one job) can be merged"
            )
    workers = [manifest_get(m, ("dataset", "filters", "worker_index")) for m in manifests]
    for i, w in enumerate(workers):
        if w is not None and w in workers[:i]:
            raise IncompatibleCachesError(
                f"{names[i]} and {names[workers.index(w)]} are both worker {w}: "
                "the same slice twice; merge each worker's cache once"
            )


def _differences(a, b, prefix: tuple) -> list[tuple]:
    """Key paths (under `prefix`) where two JSON values differ, descending into objects."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b)) for d in _differences(a.get(key), b.get(key), (*prefix, key))]
    return [] if a == b else [prefix]


def merge_caches(out, caches: list, *, staging=None) -> dict:
    """Combine worker caches into one folder `out` (copies shards; inputs are left untouched), or into an
    object-store URL: merged in a local staging folder, then uploaded with the manifest last (_merge_to_store).

    Refuses inputs that do not belong together (check_mergeable), a cache given twice, an input that
    fails `verify_cache` (every input is verified first, rows decoded), duplicate example or reject ids
    across the inputs, and any shard whose bytes change while they are copied (hashed as they stream). Every worker's provenance is kept in `merged_from`. The teacher's
    tokenizer files (the same tokenizer in every input) are copied from the first input that has them.
    Every input is read through formats.trust; every file is written through formats.safe_write.
    """
    if not caches:
        raise InputError("merge needs at least one cache")
    from formats.remote_write import is_remote, local_path

    if is_remote(out):
        return _merge_to_store(str(out), caches, staging)
    out = Path(local_path(out))
    if os.path.lexists(out) and (not out.is_dir() or out.is_symlink() or any(out.iterdir())):
        raise InputError(f"{printable(str(out))} exists and is not empty (or not a folder); merge writes a new folder")
    names = [str(c) for c in caches]
    if len(set(names)) != len(names):
        raise IncompatibleCachesError(f"a cache is given twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    inputs = [open_cache(c) for c in caches]
    manifests = [load_manifest(f) for f in inputs]  # types, names inside each cache, no duplicate shard entries
    check_mergeable(manifests, names)
    for f in inputs:  # every check verify makes (each row decoded): merge never copies what a reader refuses
        verify_cache(f)
    rejects = [read_rejects(f, m) for f, m in zip(inputs, manifests)]  # sha256-checked
    _check_disjoint(inputs, manifests, rejects)
    existed = out.exists()
    make_folder(out)
    try:
        shards = []
        for w, (files, m) in enumerate(zip(inputs, manifests)):
            for shard in m["shards"]:
                name = f"w{w:03d}-{shard['file']}"
                with AtomicFile(out, name) as f:  # hashed as it streams; a wrong sha256 leaves nothing
                    files.copy_to((shard["file"],), f, size=shard["bytes"], sha256=shard["sha256"])
                shards.append({**shard, "file": name})
        all_rejects = [r for part in rejects for r in part]
        rejects_bytes = "".join(json.dumps(r) + "\n" for r in all_rejects).encode()
        with AtomicFile(out, REJECTS_NAME) as f:
            f.write(rejects_bytes)
        merged = _merged_manifest(caches, manifests)
        merged["shards"] = shards
        merged.pop("tokenizer_files", None)  # the same tokenizer in every input: carry the first input's files
        carrier = next(((f, m) for f, m in zip(inputs, manifests) if m.get("tokenizer_files")), None)
        if carrier is not None:
            merged["tokenizer_files"] = copy_tokenizer_files(*carrier, out)
        by_reason = tally_reasons(all_rejects)  # counted from the rejects themselves, not the inputs' claims
        merged["counts"] = {
            "examples": sum(s["rows"] for s in shards),
            "positions": sum(s["positions"] for s in shards),
            "rejects": len(all_rejects),
            "rejects_by_reason": by_reason,
            "bytes": sum(s["bytes"] for s in shards),
        }
        if all(m["counts"].get("inputs") is not None for m in manifests):  # each worker accounted for its inputs
            merged["counts"]["inputs"] = sum(m["counts"]["inputs"] for m in manifests)
        merged["counts"]["bytes_per_position"] = merged["counts"]["bytes"] / max(1, merged["counts"]["positions"])
        merged["rejects_file"] = {
            "file": REJECTS_NAME,
            "count": len(all_rejects),
            "sha256": hashlib.sha256(rejects_bytes).hexdigest(),
        }
        write_card(out, merged)
        write_json_atomic(out / MANIFEST_NAME, merged)
    except BaseException:  # a full disk, a file size limit, a bad input shard: leave the folder as it was
        shutil.rmtree(out, ignore_errors=True)
        if existed:
            out.mkdir()
        raise
    return merged


_MERGED_NAMES = re.compile(
    rf"w\d{{3}}-[A-Za-z0-9._-]+{re.escape(SHARD_SUFFIX)}|{re.escape(REJECTS_NAME)}|{re.escape(CARD_NAME)}"
    rf"|{re.escape(TOKENIZER_DIR)}/[A-Za-z0-9_-][A-Za-z0-9._-]*"
)


def _merge_to_store(url: str, caches: list, staging) -> dict:
    """merge_caches into `url`: the merge is redone in the staging folder (a copy; merge keeps no partial
    state), then uploaded with the objects a killed earlier upload finished skipped (formats/remote_write.py).
    A prefix holding a complete cache, or files a merge does not write, is refused before any copying."""
    from formats.remote_write import Remote, write_staged

    if MANIFEST_NAME in Remote(url).listing():
        raise InputError(f"{printable(url)} already holds a complete cache (manifest.json); merge writes a new prefix")

    def build(folder: Path) -> dict:
        if folder.is_dir():  # an earlier merge's staging (a merge keeps no partial state): redone from scratch
            other = sorted(
                p.name
                for p in folder.iterdir()
                if not _MERGED_NAMES.fullmatch(p.name)
                and p.name not in (MANIFEST_NAME, TOKENIZER_DIR)
                and not p.name.startswith(".")
            )
            if other:
                raise InputError(
                    f"{printable(str(folder))} (the staging folder) holds files a merge does not write "
                    f"({', '.join(printable(n) for n in other[:3])}); give an empty or new --staging folder"
                )
            shutil.rmtree(folder)
        return merge_caches(folder, caches)

    return write_staged(url, build, last=MANIFEST_NAME, staging=staging, allowed=_MERGED_NAMES.fullmatch)


def _check_disjoint(inputs: list, manifests: list[dict], rejects: list[list[dict]]) -> None:
    """No example or reject id twice, within one input or across inputs (reads only the id column)."""
    seen: dict[str, str] = {}
    for files, m, rej in zip(inputs, manifests, rejects):
        ids = []
        for i in range(len(m["shards"])):
            shard = ShardFile(files, m, i, hash_first=True)
            try:
                for g in range(shard.num_row_groups):
                    ids += shard.read(g, columns=["id"]).column("id").to_pylist()
            finally:
                shard.close()
        for ex_id in ids + [r["id"] for r in rej]:
            if ex_id in seen:
                raise IncompatibleCachesError(
                    f"record {ex_id!r:.200} is in both {printable(seen[ex_id])} and {printable(files.path)}: these caches "
                    "overlap (the same worker slice twice?) or one holds it twice (run `kdcache verify`); merge "
                    "disjoint, verified caches only"
                )
            seen[ex_id] = files.path


def _merged_manifest(caches: list, manifests: list[dict]) -> dict:
    """The first input's settings (all inputs agree on them), the merge's own command and time, the
    worker slices merged, and each input's provenance in `merged_from`."""
    merged = json.loads(json.dumps(manifests[0]))  # a deep copy
    merged.update(created=now_iso(), command=command_line())
    workers = [manifest_get(m, ("dataset", "filters", "worker_index")) for m in manifests]
    if all(isinstance(w, int) for w in workers):
        merged["dataset"]["filters"]["worker_index"] = sorted(workers)
    merged["merged_from"] = [
        {
            "path": str(c),
            **{
                key: m.get(key)
                for key in (
                    "created",
                    "command",
                    "mode",
                    "teacher",
                    "tokenizer",
                    "dataset",
                    "extra",
                    "counts",
                    "merged_from",
                )
                if key in m
            },
        }
        for c, m in zip(caches, manifests)
    ]
    return merged
