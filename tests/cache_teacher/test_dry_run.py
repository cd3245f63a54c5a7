"""cache_teacher.dry_run: `kdcache cache --dry-run`'s counts (inputs, examples, rejects, truncated,
tokens, positions; generate mode's upper bound; per worker slice) and its size and time estimate, on a
tiny tokenizer with a chat template (no teacher weights: the dry run never starts the teacher).
tests/cache_teacher/test_run.py checks that its counts match a real run's."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache_teacher.dry_run import DEFAULT_TOKENS_PER_S, DryRun, _human, dry_run
from formats.template import ChatTemplater

from ..tokenizer_helpers import tiny_tokenizer
from .teacher_helpers import make_config, write_jsonl


def chat(i: int, reply: str) -> dict:
    return {
        "id": f"r{i}",
        "messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": reply}],
    }


GOOD = [chat(i, "Two plus two is four. " * (i + 1)) for i in range(6)]
BAD = [
    {"id": "no-messages"},
    {"id": "bad-role", "messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"id": "only-user", "messages": [{"role": "assistant", "content": "Hello"}]},  # generate: no prompt
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    tiny_tokenizer().save_pretrained(path)  # a dry run needs only the tokenizer
    return path


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("rows") / "rows.jsonl", GOOD + BAD)


def config_for(teacher, rows, tmp_path, **kw):
    return make_config(teacher=str(teacher), dataset=str(rows), out=str(tmp_path / "cache"), dry_run=True, **kw)


def templated(max_length=256, length_policy="truncate"):
    templater = ChatTemplater(tiny_tokenizer(), max_length, length_policy)
    return templater, [templater.score(r) for r in GOOD]


def test_score_mode_counts_what_the_template_gives(teacher, rows, tmp_path):
    dry = dry_run(config_for(teacher, rows, tmp_path))
    _, items = templated()
    assert isinstance(dry, DryRun) and (dry.mode, dry.k, dry.worker) == ("score", 8, "0/1")
    assert (dry.inputs, dry.examples, dry.truncated) == (len(GOOD) + len(BAD), len(GOOD), 0)
    assert dry.tokens == sum(len(t.input_ids) for t in items)
    assert dry.positions == sum(len(t.target_positions) for t in items)
    # each bad input once, by its reason code (an assistant turn with nothing before it: the template's)
    assert dict(dry.rejects) == {"missing_messages": 1, "unknown_role": 1, "template_error": 1}
    assert sum(dry.rejects.values()) + dry.examples == dry.inputs
    assert not (tmp_path / "cache").exists()  # nothing written
    assert dry.wall_s > 0


def test_score_mode_counts_truncated_records_and_their_cut_positions(teacher, rows, tmp_path):
    dry = dry_run(config_for(teacher, rows, tmp_path, max_length=40))
    _, items = templated(max_length=40)
    cut = [t for t in items if t.truncated]
    assert cut and dry.truncated == len(cut)
    assert dry.tokens == sum(len(t.input_ids) for t in items) and all(len(t.input_ids) <= 40 for t in items)
    dropped = dry_run(config_for(teacher, rows, tmp_path, max_length=40, length_policy="drop"))
    assert dropped.truncated == 0 and dropped.rejects["too_long"] == len(cut)
    assert dropped.examples == dry.examples - len(cut)


def test_generate_mode_is_an_upper_bound_of_n_full_length_responses(teacher, rows, tmp_path):
    config = config_for(teacher, rows, tmp_path, mode="generate", n=3, max_new_tokens=10)
    dry = dry_run(config)
    templater = ChatTemplater(tiny_tokenizer(), 256)
    prompts = [templater.prompt(r) for r in GOOD]
    assert dry.per_input == 3 and dry.examples == 3 * len(GOOD)
    assert dry.positions == 3 * 10 * len(GOOD)
    assert dry.tokens == sum(3 * (len(p.input_ids) + 10) for p in prompts)
    assert dict(dry.rejects) == {"missing_messages": 3, "unknown_role": 3, "no_prompt": 3}  # n per bad input
    assert "(upper bound: full-length responses)" in dry.report()


def test_worker_slices_partition_the_counts(teacher, rows, tmp_path):
    whole = dry_run(config_for(teacher, rows, tmp_path))
    slices = [dry_run(config_for(teacher, rows, tmp_path, num_workers=2, worker_index=i)) for i in (0, 1)]
    assert [s.worker for s in slices] == ["0/2", "1/2"]
    for field in ("inputs", "examples", "tokens", "positions"):
        assert sum(getattr(s, field) for s in slices) == getattr(whole, field), field
    assert slices[0].rejects + slices[1].rejects == whole.rejects


def test_tokens_per_second_defaults_per_engine_and_is_overridden(teacher, rows, tmp_path):
    assert dry_run(config_for(teacher, rows, tmp_path, engine="hf")).tokens_per_s == DEFAULT_TOKENS_PER_S["hf"]
    assert dry_run(config_for(teacher, rows, tmp_path, engine="vllm")).tokens_per_s == DEFAULT_TOKENS_PER_S["vllm"]
    given = dry_run(config_for(teacher, rows, tmp_path, engine="hf", dry_run_tokens_per_s=5000.0))
    assert given.tokens_per_s == 5000.0


def test_report_gives_size_and_time_from_the_counts():
    dry = DryRun(inputs=10, examples=8, positions=1000, tokens=540_000, truncated=1, k=64, tokens_per_s=150.0)
    dry.rejects["too_long"] = 2
    lines = dry.report().splitlines()
    assert lines[0] == "dry run over 10 inputs (score mode, worker 0/1)"
    assert lines[1] == "examples 8, rejects 2 {'too_long': 2}, truncated 1"
    assert lines[2] == "tokens 540000, trained positions 1000"
    # 1000 positions x (2 x 64 + 5) bytes = 133000 B = 129.9 KiB
    assert lines[3] == "estimated cache size <= 129.9 KiB (~133 B/position at k=64)"
    # 540000 tokens / 150 tokens/s = 3600 s
    assert lines[4].startswith("estimated teacher time 1.00 h at 150 tokens/s per worker")
    assert "--dry-run-tokens-per-s" in lines[4]


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0.0 B"),
        (1023, "1023.0 B"),
        (1024, "1.0 KiB"),
        (1.5 * 2**20, "1.5 MiB"),
        (3 * 2**30, "3.0 GiB"),
        (2**40, "1.0 TiB"),
        (5000 * 2**40, "5000.0 TiB"),  # no unit past TiB
    ],
)
def test_human_sizes(n, text):
    assert _human(n) == text
