"""Read conversation records, select this run's slice of them, and validate each one.

Sources: a hub dataset id (through `datasets`, streaming by default) or local `.jsonl` / `.json` /
`.parquet` files or folders of them. Every record gets a stable id (its own `id` field, else
`row-<index in the input>`), and all selection is by hashes of that id, so it does not depend on
the order workers run in:

    input -> --sources filter -> --fraction subsample -> --max-examples -> worker slice -> validate

`iter_records` yields `(record, None)` for a good record and `(None, (id, reason, source))` for a bad
one; a reason reads `code: detail` (the summary groups by code).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from formats.errors import FormatError, InputError
from formats.trust import loads
from formats.ids import input_record_id, keep_fraction, stable_hash, worker_of  # noqa: F401  (engines use stable_hash)

ROLES = ("system", "user", "assistant", "tool")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

Reject = tuple[str, str, str]  # (id, reason, source)


def local_files(dataset: str) -> list[Path] | None:
    """The files of a local dataset, sorted; None when `dataset` is not a local path."""
    path = Path(dataset)
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise InputError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise InputError(f"{path}: no {'/'.join(LOCAL_SUFFIXES)} files in this folder")
        return files
    if dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith((".", "/", "~")):
        raise InputError(f"dataset {dataset!r} does not exist")
    return None


MAX_RECORD_BYTES = 256 << 20  # one .jsonl line (a record beyond it is a reject, read no further)
BOM = b"\xef\xbb\xbf"


def check_local_files(files: list[Path]) -> None:
    """Refuse, before any work, a local file that cannot be read at all (InputError naming it and the fix):
    a `.parquet` that is not Parquet, a `.json` that is not UTF-8 JSON holding a list of records."""
    for path in files:
        if path.suffix == ".parquet":
            _parquet(path)
        elif path.suffix == ".json":
            _json_records(path)


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(
            f"{path}: not a readable Parquet file ({str(exc)[:160]}); convert it to .jsonl or .parquet, "
            "or remove it from the dataset folder"
        ) from None


def _json_records(path: Path) -> list:
    raw = path.read_bytes()
    try:
        data = loads(raw[len(BOM) :] if raw.startswith(BOM) else raw, str(path), max_bytes=len(raw), what="the file")
    except FormatError as exc:
        hint = (
            "re-encode it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
            if "not UTF-8" in str(exc)
            else "fix it, or write one record per line as .jsonl (a bad line is then one reject)"
        )
        raise InputError(f"{exc}: a .json dataset is one JSON document; {hint}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise InputError(f"{path}: a .json dataset must be a list of records (or {{'data': [...]}})")
    return data


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of each non-empty line; bytes None for a line longer than MAX_RECORD_BYTES
    (skipped without being held in memory)."""
    with path.open("rb") as fh:
        lineno = 0
        while True:
            line = fh.readline(MAX_RECORD_BYTES + 1)
            if not line:
                return
            lineno += 1
            if lineno == 1 and line.startswith(BOM):
                line = line[len(BOM) :]
            if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
                while (rest := fh.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield lineno, None
                continue
            if line.strip():
                yield lineno, line


def _read_local(files: list[Path]) -> Iterator[Any]:
    check_local_files(files)
    for path in files:
        if path.suffix == ".jsonl":
            for lineno, line in _jsonl_lines(path):
                if line is None:
                    yield _BadJSON(f"record_too_large: {path.name} line {lineno}: more than {MAX_RECORD_BYTES} bytes")
                    continue
                try:
                    yield loads(line, f"{path.name} line {lineno}", max_bytes=MAX_RECORD_BYTES, what="the record")
                except FormatError as exc:  # not UTF-8, not JSON, nested too deep, a 5,000-digit number, ...
                    yield _BadJSON(f"invalid_json: {exc}")
        elif path.suffix == ".json":
            yield from _json_records(path)
        else:
            for batch in _parquet(path).iter_batches(batch_size=1024):
                yield from batch.to_pylist()


class _BadJSON:
    def __init__(self, reason: str):
        self.reason = reason


def _read_hub(config) -> Iterator[Any]:
    try:
        import datasets
    except ModuleNotFoundError:
        raise InputError(
            f"{config.dataset!r} is not a local file or folder, and reading hub datasets needs the "
            "`datasets` package (pip install datasets)"
        ) from None

    try:
        ds = datasets.load_dataset(
            config.dataset,
            config.dataset_config,
            split=config.split,
            streaming=config.streaming,
            revision=config.dataset_revision,
        )
        rows = iter(ds)
        first = next(rows, None)  # a streamed dataset connects here: its errors are the dataset's too
    except Exception as exc:  # ConnectionError, DatasetNotFoundError, offline mode, a typo in the id or split
        import os

        offline = (
            " (HF_HUB_OFFLINE=1 is set: only datasets in the local hub cache load)"
            if os.environ.get("HF_HUB_OFFLINE") == "1"
            else ""
        )
        cause = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InputError(
            f"cannot load dataset {config.dataset!r} split {config.split!r}: {type(exc).__name__}: "
            f"{cause}{offline}; give a local .jsonl/.json/.parquet file or folder, or check the id, "
            "split and network"
        ) from None
    if first is not None:
        yield first
        yield from rows


def read_raw(config) -> Iterator[Any]:
    files = local_files(config.dataset)
    return _read_local(files) if files is not None else _read_hub(config)


def validate(record: Any, require_assistant: bool = True) -> str | None:
    """None for a good record, else the reason `code: detail`.

    Generate mode passes require_assistant=False: a prompt-only conversation is a valid prompt.
    """
    if not isinstance(record, dict):
        return f"not_a_dict: record is a {type(record).__name__}"
    if "messages" not in record or record["messages"] is None:
        return "missing_messages: no `messages` field"
    messages = record["messages"]
    if not isinstance(messages, list):
        return f"messages_not_list: `messages` is a {type(messages).__name__}"
    if not messages:
        return "empty_messages: `messages` is empty"
    n_assistant = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message_not_dict: message {i} is a {type(m).__name__}"
        role = m.get("role")
        if role not in ROLES:
            return f"unknown_role: message {i} has role {role!r} (known: {', '.join(ROLES)})"
        content = m.get("content")
        if not isinstance(content, str):
            return f"non_string_content: message {i} ({role}) has content of type {type(content).__name__}"
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate ("\\ud800" in JSON): no tokenizer can encode it
            return f"invalid_text: message {i} ({role}) holds {content[exc.start]!r} at character {exc.start}, not text"
        if role == "assistant":
            n_assistant += 1
            if not content.strip():
                return f"empty_assistant_content: message {i} is an empty assistant turn"
    if n_assistant == 0 and require_assistant:
        return "no_assistant_turn: no message has role 'assistant'"
    return None


def iter_records(config) -> Iterator[tuple[dict | None, Reject | None]]:
    """This worker's records: `(record, None)` or `(None, (id, reason, source))`, in input order.

    A good record is `{"id", "messages": [{"role", "content"}], "source"}`.
    """
    sources = set(config.sources) if config.sources else None
    seen: set[str] = set()
    taken = 0
    index = -1
    for index, raw in enumerate(read_raw(config)):
        if config.max_examples is not None and taken >= config.max_examples:
            break
        rid = input_record_id(raw, index)
        source = raw.get("source") if isinstance(raw, dict) else None
        source = source if isinstance(source, str) else ""
        if sources is not None and source not in sources:
            continue
        if not keep_fraction(rid, config.fraction, config.seed):
            continue
        taken += 1
        if worker_of(rid, config.num_workers) != config.worker_index:
            continue
        if rid in seen:  # its reject gets an id no record has had (nor will: a later record with it is a duplicate)
            dup = f"{rid}#dup{index}"
            while dup in seen:
                dup += "+"
            seen.add(dup)
            yield (
                None,
                (dup, f"duplicate_id: id {rid!r} appeared before, or was given to a duplicate (row {index})", source),
            )
            continue
        seen.add(rid)
        if isinstance(raw, _BadJSON):
            yield None, (rid, raw.reason, "")
            continue
        reason = validate(raw, require_assistant=config.mode != "generate")
        if reason is not None:
            yield None, (rid, reason, source)
            continue
        messages = [{"role": m["role"], "content": m["content"]} for m in raw["messages"]]
        yield {"id": rid, "messages": messages, "source": source}, None
    if index < 0:
        raise InputError(
            f"{config.dataset}: the dataset holds no records; nothing to cache (an empty file, or the "
            "wrong file or split?)"
        )


def expected_inputs(config) -> int | None:
    """About how many records this worker will see (for the progress bar's ETA); None when unknown."""
    if config.sources:
        return None  # the filter's yield is unknown until read
    try:
        files = local_files(config.dataset)
        if files is not None:
            total = 0
            for path in files:
                if path.suffix == ".parquet":
                    import pyarrow.parquet as pq

                    total += pq.ParquetFile(path).metadata.num_rows
                elif path.suffix == ".jsonl":
                    with path.open("rb") as fh:
                        total += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 24), b""))
                else:
                    return None
        else:
            import datasets

            builder = datasets.load_dataset_builder(
                config.dataset, config.dataset_config, revision=config.dataset_revision
            )
            total = builder.info.splits[config.split].num_examples
    except Exception:  # only an estimate: never fail a run over it
        return None
    total = int(total * config.fraction)
    if config.max_examples is not None:
        total = min(total, config.max_examples)
    return -(-total // config.num_workers)


def _hub_commit(name: str) -> str | None:
    """The commit a hub dataset id resolves to now (best effort: None offline)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name).sha
    except Exception:
        return None


def describe(config) -> dict[str, Any]:
    """The manifest's `dataset` entry: what was read and how it was filtered."""
    files = local_files(config.dataset)
    if files is not None:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode())
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        revision = "sha256:" + digest.hexdigest()
        split = config.split
    else:
        revision, split = config.dataset_revision or _hub_commit(config.dataset), config.split
    return {
        "name": config.dataset,
        "config": None if files is not None else config.dataset_config,  # a hub dataset's configuration (subset)
        "split": split,
        "revision": revision,
        "filters": {
            "sources": config.sources,
            "fraction": config.fraction,
            "seed": config.seed,
            "max_examples": config.max_examples,
            "num_workers": config.num_workers,
            "worker_index": config.worker_index,
            "max_length": config.max_length,
            "length_policy": config.length_policy,
        },
    }
