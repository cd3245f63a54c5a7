"""Writes data/heldout_chat.jsonl (the `kdcache_heldout_chat` task's data) from the Tulu 3 SFT sample.

    python -m kdcache.study.tasks.make_heldout_chat [../shared/data/tulu3_sft_sample.jsonl]

Keeps the single-turn rows (one user turn, one assistant turn) whose id falls in the trainer's held-out
split at eval_fraction 0.2 (`formats.ids.is_eval`, the split the demo trains with): a student trained
on the sample with eval_fraction >= 0.2 never saw them. Each line: {"id", "prompt", "response"}, the
text as it is; lm-eval renders the prompt with the evaluated model's chat template (docs/EVAL.md).
Data: ODC-BY-1.0, Allen Institute for AI (data/README.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from formats.ids import is_eval

HERE = Path(__file__).resolve().parent
EVAL_FRACTION = 0.2


def heldout_rows(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        messages = row["messages"]
        if [m["role"] for m in messages] != ["user", "assistant"] or not is_eval(row["id"], EVAL_FRACTION):
            continue
        out.append({"id": row["id"], "prompt": messages[0]["content"], "response": messages[1]["content"]})
    return out


def main(argv: list[str]) -> None:
    source = Path(argv[0] if argv else HERE.parents[2] / ".." / "shared" / "data" / "tulu3_sft_sample.jsonl")
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    out = HERE / "data" / "heldout_chat.jsonl"
    with out.open("w") as f:
        for item in heldout_rows(rows):
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"{out}: {sum(1 for _ in out.open())} rows")


if __name__ == "__main__":
    main(sys.argv[1:])
