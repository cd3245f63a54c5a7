"""kdcache.demo_prompts: the demo's built-in prompts and `write_prompts` (a Tulu-style .jsonl that `kdcache
cache` reads: ids, source, one user turn each; `limit`, the parent folders, a rewrite). The demo itself
(tests/kdcache/test_demo.py) only runs them through the teacher."""

from __future__ import annotations

import json

import pytest

from cache_teacher.data import validate
from kdcache.demo_prompts import PROMPTS, write_prompts


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_prompts_are_distinct_non_empty_and_short():
    assert len(PROMPTS) == len(set(PROMPTS)) == 36
    assert all(p == p.strip() and 10 <= len(p) <= 200 for p in PROMPTS)  # short enough for a CPU teacher


def test_write_prompts_writes_one_user_turn_per_prompt_in_order(tmp_path):
    path = write_prompts(tmp_path / "prompts.jsonl")
    assert path == tmp_path / "prompts.jsonl"
    rows = read(path)
    assert [r["messages"] for r in rows] == [[{"role": "user", "content": p}] for p in PROMPTS]
    assert rows[0] == {
        "id": "kdcache-demo-000",
        "source": "kdcache-demo",
        "messages": [{"role": "user", "content": PROMPTS[0]}],
    }
    assert [r["id"] for r in rows] == [f"kdcache-demo-{i:03d}" for i in range(36)]


def test_every_written_record_is_a_valid_generate_mode_prompt(tmp_path):
    rows = read(write_prompts(tmp_path / "p.jsonl"))
    assert all(validate(r, require_assistant=False) is None for r in rows)
    assert validate(rows[0]).startswith("no_assistant_turn")  # prompts only: not score-mode data


def test_the_non_ascii_prompt_round_trips(tmp_path):
    (spanish,) = [p for p in PROMPTS if not p.isascii()]
    contents = [r["messages"][0]["content"] for r in read(write_prompts(tmp_path / "p.jsonl"))]
    assert spanish in contents


@pytest.mark.parametrize("limit, n", [(1, 1), (8, 8), (36, 36), (100, 36), (None, 36)])
def test_limit_takes_the_first_prompts(tmp_path, limit, n):
    rows = read(write_prompts(tmp_path / "p.jsonl", limit))
    assert [r["messages"][0]["content"] for r in rows] == PROMPTS[:n]


def test_parent_folders_are_made_and_an_old_file_is_replaced(tmp_path):
    path = tmp_path / "demo" / "run" / "prompts.jsonl"
    write_prompts(path, 10)
    assert len(read(path)) == 10
    write_prompts(path, 3)  # a rerun with fewer prompts: nothing of the old file is left
    assert len(read(path)) == 3


def test_write_prompts_accepts_a_string_path(tmp_path):
    path = write_prompts(str(tmp_path / "p.jsonl"), 2)
    assert path == tmp_path / "p.jsonl" and len(read(path)) == 2
