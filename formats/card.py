"""The dataset card (README.md) that lets a cache folder be uploaded to a dataset hub unchanged."""
from __future__ import annotations

import json
from pathlib import Path

from formats.schema import CARD_NAME


def write_card(root: Path, manifest: dict) -> None:
    t, tok, data, counts = manifest.get("teacher", {}), manifest.get("tokenizer", {}), manifest.get("dataset", {}), manifest["counts"]
    codec = manifest["codec"]
    text = f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: "*.parquet"
tags:
- knowledge-distillation
- kdcache
---
# Teacher top-k cache (kdcache format v{manifest['format_version']})

Top-{codec['k']} next-token log-probabilities of the teacher **{t.get('name_or_path', '?')}**
({t.get('engine', '?')} {t.get('engine_version', '')}, {t.get('dtype', '?')}) at every assistant token
of **{data.get('name', '?')}** (split `{data.get('split', '?')}`), mode `{manifest.get('mode', 'score')}`.

| | |
|---|---|
| examples | {counts.get('examples')} |
| trained positions | {counts.get('positions')} |
| rejected input records | {counts.get('rejects')} (see `rejects.jsonl`) |
| bytes per position | {counts.get('bytes_per_position', 0):.1f} |
| codec | `{codec['name']}` k={codec['k']} mass={codec.get('mass')} |
| tokenizer fingerprint | `{tok.get('fingerprint', '?')}` (vocab {tok.get('vocab_size', '?')}) |
| created | {manifest.get('created')} |

Load the rows with any Parquet reader (`datasets.load_dataset("parquet", data_files="*.parquet")`,
`pyarrow.dataset.dataset(folder)`): `id`, `source`, `input_ids`, `target_starts`/`target_ends` (the
trained positions) are plain columns; the teacher's entries are codec streams, decoded by
`formats.CacheReader` (pip install kdcache) or by the reference decoder in kdcache's docs/FORMAT.md.
`manifest.json` holds the full provenance and a sha256 per shard; `kdcache verify` checks them.

Command: `{manifest.get('command', '')}`

Provenance:
```json
{json.dumps({k: manifest.get(k) for k in ('teacher', 'tokenizer', 'dataset', 'extra')}, indent=2)}
```
"""
    (root / CARD_NAME).write_text(text)
