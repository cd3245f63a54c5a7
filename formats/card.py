"""The dataset card (README.md) that lets a cache folder be uploaded to a dataset hub unchanged.

Built with huggingface_hub's DatasetCard / DatasetCardData (the YAML header the hub reads: license, tags,
`configs` naming exactly the manifest's shards, and a `kdcache` section with the provenance: teacher id,
revision and weight hashes, dataset id, configuration and revision, kdcache version), then a Markdown
body: what the cache holds, its size and quality figures, how to load it, and the manifest's provenance
as JSON. Every value comes from the manifest, which is untrusted input (a cache from a stranger): each is
escaped to one line of text before it reaches the header or the body, so none can add lines, keys, table
rows or code fences to the card.
"""

from __future__ import annotations

import json
from pathlib import Path

from formats.safe_write import write_text_atomic
from formats.schema import CARD_NAME
from formats.trust import printable

TAGS = ["knowledge-distillation", "kdcache"]
UNKNOWN_LICENSE = "unknown"  # the hub's own value for it
MAX_CARD_WEIGHT_FILES = 64  # the header lists at most this many (manifest.json has them all)
MAX_KEY = 120  # characters of a header key (YAML writes a longer one as a two-line "? key" entry)


def card_value(value) -> str:
    """A manifest value as one line of card text: escaped (no newline or terminal control can add lines
    or markup to the card), backticks and pipes neutralized."""
    return printable(value).replace("`", "'").replace("|", "/")


def header_yaml(data) -> str:
    """Card data (a huggingface_hub CardData) as the YAML between the card's `---` lines, one line per value:
    huggingface_hub's to_yaml folds a long value with spaces over several lines at 80 columns, which a value
    from a manifest must never do."""
    import yaml

    return yaml.safe_dump(data.to_dict(), sort_keys=False, allow_unicode=True, width=float("inf")).strip()


def _opt(value) -> str | None:
    """A header value: None stays null, anything else becomes one line of text (`card_value`)."""
    return None if value is None else card_value(value)


def _shown(value, default: str) -> str:
    """A table cell: the value as inline code (escaped), or `default` in words when it is null."""
    return default if value is None else f"`{card_value(value)}`"


def _revision(teacher: dict) -> str:
    """The teacher's revision cell: the commit it resolved to, and the revision as given where it differs."""
    commit, given = teacher.get("commit"), teacher.get("revision")
    if commit is None:
        return _shown(given, "not recorded (a local folder, or the hub's default branch)")
    return _shown(commit, "") + (f" ({_shown(given, '')})" if given is not None and given != commit else "")


def _section(manifest: dict, key: str) -> dict:
    value = manifest.get(key)
    return value if isinstance(value, dict) else {}


def license_ids(manifest: dict) -> list[str] | str:
    """The card's `license`: the manifest's license id(s), escaped; "unknown" when none was recorded."""
    lic = _section(manifest, "license").get("id")
    if lic is None:
        return UNKNOWN_LICENSE
    return [card_value(i) for i in lic] if isinstance(lic, list) else card_value(lic)


def _is_hub_dataset(dataset: dict) -> bool:
    """A hub dataset id (a local file or folder is recorded with a `sha256:` revision over its files)."""
    name, revision = dataset.get("name"), dataset.get("revision")
    return isinstance(name, str) and name.count("/") == 1 and not str(revision or "").startswith("sha256:")


def card_data(manifest: dict):
    """The card's YAML header as a huggingface_hub DatasetCardData."""
    from huggingface_hub import DatasetCardData

    teacher, data, codec = _section(manifest, "teacher"), _section(manifest, "dataset"), manifest["codec"]
    files = teacher.get("weight_files") if isinstance(teacher.get("weight_files"), dict) else {}
    listed = dict(list(files.items())[:MAX_CARD_WEIGHT_FILES])
    hub = _is_hub_dataset(data)
    return DatasetCardData(
        license=license_ids(manifest),
        pretty_name=f"kdcache top-{card_value(codec['k'])} cache of {card_value(teacher.get('name_or_path', '?'))}",
        tags=list(TAGS),
        source_datasets=[card_value(data["name"])] if hub else None,
        configs=[
            {
                "config_name": "default",
                # the listed shards by name (not a glob: a file the manifest does not list is never loaded)
                "data_files": [{"split": "train", "path": [card_value(s["file"]) for s in manifest.get("shards", [])]}],
            }
        ],
        kdcache={
            "format_version": manifest["format_version"],
            "kdcache_version": _opt(manifest.get("kdcache_version")),
            "mode": card_value(manifest.get("mode", "score")),
            "k": codec["k"],
            "teacher": {
                "name_or_path": _opt(teacher.get("name_or_path")),
                "revision": _opt(teacher.get("revision")),
                "commit": _opt(teacher.get("commit")),
                "weights_sha256": _opt(teacher.get("weights_sha256")),
                "weight_files": {card_value(k)[:MAX_KEY]: card_value(v) for k, v in listed.items()} or None,
            },
            "dataset": {
                "name": _opt(data.get("name")),
                "config": _opt(data.get("config")),
                "split": _opt(data.get("split")),
                "revision": _opt(data.get("revision")),
            },
            "license_source": _opt(_section(manifest, "license").get("source")),
        },
    )


def card_body(manifest: dict) -> str:
    """The Markdown under the header: every manifest value escaped (`card_value`), the provenance block JSON with
    its backticks escaped (the code fence cannot be closed from inside)."""
    t, tok, data, counts, lic = (
        {key: card_value(value) for key, value in _section(manifest, name).items()}
        for name in ("teacher", "tokenizer", "dataset", "counts", "license")
    )
    raw_counts, codec = manifest["counts"], manifest["codec"]
    provenance = json.dumps({k: manifest.get(k) for k in ("teacher", "tokenizer", "dataset", "extra")}, indent=2)
    provenance = provenance.replace("`", "\\u0060")
    licenses = license_ids(manifest)
    license_text = ", ".join(licenses) if isinstance(licenses, list) else licenses
    license_note = (
        f"{license_text} ({lic.get('source', 'source not recorded')})"
        if licenses != UNKNOWN_LICENSE
        else "unknown: none was recorded (`kdcache cache --license SPDX_ID`); check the source dataset's terms"
    )
    teacher, dataset = _section(manifest, "teacher"), _section(manifest, "dataset")
    files = teacher.get("weight_files")
    weights_note = (
        f"`{card_value(teacher['weights_sha256'])}` (over the weight files: {len(files) if isinstance(files, dict) else '?'}, "
        "each in `teacher.weight_files`)"
        if teacher.get("weights_sha256") is not None
        else "not recorded"
    )
    by_reason = raw_counts.get("rejects_by_reason") or {}
    reasons = ", ".join(
        f"{card_value(k)}: {card_value(v)}" for k, v in sorted(by_reason.items(), key=lambda kv: str(kv[0]))
    )
    positions, examples = raw_counts.get("positions"), raw_counts.get("examples")
    per_example = f"{positions / examples:.1f}" if examples and isinstance(positions, int) else "?"
    return f"""# Teacher top-k cache (kdcache format v{manifest["format_version"]})

Top-{codec["k"]} next-token log-probabilities of the teacher **{t.get("name_or_path", "?")}**
({t.get("engine", "?")} {t.get("engine_version", "")}, {t.get("dtype", "?")}) at every assistant token
of **{data.get("name", "?")}** (split `{data.get("split", "?")}`), mode `{card_value(manifest.get("mode", "score"))}`.

| | |
|---|---|
| examples | {counts.get("examples")} |
| trained positions | {counts.get("positions")} |
| positions per example | {per_example} |
| rejected input records | {counts.get("rejects")} (see `rejects.jsonl`) |
| rejects by reason | {reasons or "none"} |
| bytes | {counts.get("bytes", "?")} |
| bytes per position | {raw_counts.get("bytes_per_position", 0):.1f} |
| codec | `{codec["name"]}` k={codec["k"]} mass={codec.get("mass")} |
| tokenizer fingerprint | `{tok.get("fingerprint", "?")}` (vocab {tok.get("vocab_size", "?")}) |
| teacher revision | {_revision(teacher)} |
| teacher weights sha256 | {weights_note} |
| dataset revision | {_shown(dataset.get("revision"), "not recorded")} |
| dataset configuration | {_shown(dataset.get("config"), "default")} |
| license | {license_note} |
| kdcache version | {_shown(manifest.get("kdcache_version"), "not recorded")} |
| created | {card_value(manifest.get("created"))} |

## Load it

Run `kdcache verify` on it first (checksums, schema, values). With `datasets` (this card's `data_files` lists
exactly the shards the manifest lists, so nothing else is loaded; `USER/NAME` is this repo on the hub, or
give the path of this folder):

    import datasets
    rows = datasets.load_dataset("USER/NAME", split="train")

`id`, `source`, `input_ids`, `target_starts`/`target_ends` (the trained positions) are plain columns; the
teacher's entries are codec streams, decoded by kdcache (`formats.CacheReader`; `kdcache export` writes
them out as plain columns) or by the reference decoder in kdcache's docs/FORMAT.md. With kdcache:

    kdcache pull USER/NAME caches/this    # download, then verify
    kdcache train --cache caches/this --student STUDENT --out runs/kd    # or --cache hf://datasets/USER/NAME

With transformers' Trainer or TRL (`train_student.hf`):

    from train_student.hf import KDCacheDataset
    train = KDCacheDataset("caches/this", split="train")    # verified when opened

`manifest.json` holds the full provenance and a sha256 per shard; `kdcache verify` checks them.

Command: `{card_value(manifest.get("command", ""))}`

Provenance:
```json
{provenance}
```
"""


def card_text(manifest: dict) -> str:
    """The whole card: the header (DatasetCardData) over the body, parsed back by DatasetCard (the header
    must be valid card metadata before it is written)."""
    from huggingface_hub import DatasetCard

    text = f"---\n{header_yaml(card_data(manifest))}\n---\n{card_body(manifest)}"
    DatasetCard(text)  # raises unless the header parses back as card metadata (str(card) would fold it again)
    return text


def write_card(root: Path, manifest: dict) -> None:
    """Write the card through formats.safe_write (a README.md symlink is replaced, never followed); every
    value from the manifest is escaped (a teacher name cannot add lines to the card)."""
    write_text_atomic(Path(root) / CARD_NAME, card_text(manifest))
