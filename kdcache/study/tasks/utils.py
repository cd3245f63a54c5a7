"""Helpers of the local lm-eval tasks in this folder (referenced from the YAML files with `!function`).

The data files lie in data/ beside this file; they are read by path relative to it, so the tasks work
from any working directory and never download anything.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def _load_jsonl(name: str, fields: tuple[str, ...]):
    """{"test": the rows of data/`name`}, each with `id` and `fields` (strings); InputError naming the line else."""
    import datasets

    from formats.errors import InputError

    path = DATA / name
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 ({exc}); restore it from the repository") from exc
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {n}: not JSON ({exc.msg})") from exc
        missing = [f for f in ("id", *fields) if not isinstance(row, dict) or not isinstance(row.get(f), str)]
        if missing:
            raise InputError(f"{path}: line {n}: field(s) {', '.join(missing)} missing or not a string")
        rows.append({f: row[f] for f in ("id", *fields)})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_heldout_chat(chat_template: bool = True, **_):
    """data/heldout_chat.jsonl: {"id", "prompt", "response"} (made by make_heldout_chat.py).

    chat_template (lm-eval task metadata; `kdcache eval` sets it): whether lm-eval renders the prompt with
    the model's chat template. Without one, a blank line separates the prompt from the response."""
    dataset = _load_jsonl("heldout_chat.jsonl", ("prompt", "response"))
    if chat_template:
        return dataset
    return dataset.map(lambda row: {"prompt": row["prompt"] + "\n\n"})


def load_arith_qa(**_):
    """data/arith_qa.jsonl: {"id", "question", "answer"}."""
    return _load_jsonl("arith_qa.jsonl", ("question", "answer"))


def heldout_chat_results(doc: dict, results: list) -> dict:
    """Per document: the reference response's summed log-likelihood given the prompt (nats), the same with
    its UTF-8 byte count for bits per byte, and whether it is the model's greedy continuation."""
    loglikelihood, is_greedy = results[0]
    return {
        "loglikelihood": loglikelihood,
        "bits_per_byte": (loglikelihood, len(doc["response"].encode("utf-8"))),
        "greedy_match": int(is_greedy),
    }
