"""The dataset card (README.md) that lets a cache folder be uploaded to a dataset hub unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from formats.safe_write import write_text_atomic
from formats.schema import CARD_NAME
from formats.trust import printable


def _text(value) -> str:
    """A manifest value as one line of card text: escaped (no newline or terminal control can add lines
    or markup to the card), backticks and pipes neutralized."""
    return printable(value).replace("`", "'").replace("|", "/")


def write_card(root: Path, manifest: dict) -> None:
    """Write the card through formats.safe_write (a README.md symlink is replaced, never followed); every
    value from the manifest is escaped (a teacher name cannot add lines to the card)."""
    t, tok, data, counts = (
        manifest.get("teacher", {}),
        manifest.get("tokenizer", {}),
        manifest.get("dataset", {}),
        manifest["counts"],
    )
    t, tok, data = ({key: _text(value) for key, value in section.items()} for section in (t, tok, data))
    codec = manifest["codec"]
    # the listed shards by name (not a glob: a file the manifest does not list is never loaded with them)
    provenance = json.dumps({k: manifest.get(k) for k in ("teacher", "tokenizer", "dataset", "extra")}, indent=2)
    provenance = provenance.replace("`", "\\u0060")  # a JSON escape: the code fence cannot be closed from inside
    shard_list = "".join(f"\n    - {s['file']}" for s in manifest.get("shards", [])) or " []"
    text = f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path:{shard_list}
tags:
- knowledge-distillation
- kdcache
---
# Teacher top-k cache (kdcache format v{manifest["format_version"]})

Top-{codec["k"]} next-token log-probabilities of the teacher **{t.get("name_or_path", "?")}**
({t.get("engine", "?")} {t.get("engine_version", "")}, {t.get("dtype", "?")}) at every assistant token
of **{data.get("name", "?")}** (split `{data.get("split", "?")}`), mode `{manifest.get("mode", "score")}`.

| | |
|---|---|
| examples | {counts.get("examples")} |
| trained positions | {counts.get("positions")} |
| rejected input records | {counts.get("rejects")} (see `rejects.jsonl`) |
| bytes per position | {counts.get("bytes_per_position", 0):.1f} |
| codec | `{codec["name"]}` k={codec["k"]} mass={codec.get("mass")} |
| tokenizer fingerprint | `{tok.get("fingerprint", "?")}` (vocab {tok.get("vocab_size", "?")}) |
| created | {_text(manifest.get("created"))} |

Load the rows with any Parquet reader after `kdcache verify` (this card's `data_files` lists exactly the
shards the manifest lists; `datasets.load_dataset` on this folder reads them): `id`, `source`, `input_ids`,
`target_starts`/`target_ends` (the trained positions) are plain columns; the teacher's entries are codec
streams, decoded by `formats.CacheReader` (pip install kdcache) or by the reference decoder in kdcache's
docs/FORMAT.md.
`manifest.json` holds the full provenance and a sha256 per shard; `kdcache verify` checks them.

Command: `{_text(manifest.get("command", ""))}`

Provenance:
```json
{provenance}
```
"""
    write_text_atomic(Path(root) / CARD_NAME, text)
