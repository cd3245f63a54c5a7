"""formats/card.py: write_card's README.md: the YAML header lists exactly the manifest's shards, the table
shows the manifest's counts and codec, the provenance block is the manifest's sections as JSON, and no value
from the manifest can add lines, close the code fence or break a table row. (A teacher name with a newline
and a planted README.md symlink are in test_hostile_cache.py.)"""

from __future__ import annotations

import json

import pytest
import yaml

from formats.card import write_card
from formats.codec import CodecConfig
from formats.manifest import load_manifest, new_manifest

from .format_helpers import write_cache

SHARDS = ["part-00000.parquet", "part-00001.parquet", "w001-part-00000.parquet"]


def manifest(**provenance) -> dict:
    m = new_manifest(CodecConfig(k=16, mass=0.95).to_dict(), {"command": "kdcache cache --k 16", **provenance})
    m["counts"] = {"examples": 30, "positions": 1234, "rejects": 2, "bytes_per_position": 114.3655}
    m["shards"] = [{"file": name} for name in SHARDS]
    m["created"] = "2026-01-02T03:04:05Z"
    return m


def card(tmp_path, m) -> str:
    write_card(tmp_path, m)
    return (tmp_path / "README.md").read_text()


def header(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def line_of(text: str, start: str) -> str:
    (line,) = [x for x in text.splitlines() if x.startswith(start)]
    return line


def test_the_header_lists_exactly_the_manifests_shards(tmp_path):
    head = header(card(tmp_path, manifest()))
    (config,) = head["configs"]
    assert config["config_name"] == "default"
    assert config["data_files"] == [{"split": "train", "path": SHARDS}]
    assert head["tags"] == ["knowledge-distillation", "kdcache"]


def test_a_cache_without_shards_has_a_header_with_an_empty_file_list(tmp_path):
    write_cache(tmp_path / "c", [], rejects=[("r1", "no assistant turn")])  # every record rejected
    assert load_manifest(tmp_path / "c")["shards"] == []
    assert header((tmp_path / "c" / "README.md").read_text())["configs"][0]["data_files"][0]["path"] == []


def test_the_table_shows_the_counts_and_the_codec(tmp_path):
    text = card(
        tmp_path,
        manifest(
            teacher={
                "name_or_path": "allenai/OLMo-2",
                "engine": "vllm",
                "engine_version": "0.32.0",
                "dtype": "bfloat16",
            },
            tokenizer={"fingerprint": "f" * 64, "vocab_size": 100278},
            dataset={"name": "allenai/tulu-3-sft-mixture", "split": "train"},
            mode="generate",
        ),
    )
    assert "# Teacher top-k cache (kdcache format v1)" in text
    assert "Top-16 next-token log-probabilities of the teacher **allenai/OLMo-2**\n(vllm 0.32.0, bfloat16)" in text
    assert "of **allenai/tulu-3-sft-mixture** (split `train`), mode `generate`." in text
    assert "| examples | 30 |" in text and "| trained positions | 1234 |" in text
    assert "| rejected input records | 2 (see `rejects.jsonl`) |" in text
    assert "| bytes per position | 114.4 |" in text
    assert "| codec | `kdcache-topk-v1` k=16 mass=0.95 |" in text
    assert f"| tokenizer fingerprint | `{'f' * 64}` (vocab 100278) |" in text
    assert "| created | 2026-01-02T03:04:05Z |" in text
    assert "Command: `kdcache cache --k 16`" in text


def test_missing_sections_show_question_marks(tmp_path):
    text = card(tmp_path, manifest())
    assert "of the teacher **?**\n(? , ?)" in text and "of **?** (split `?`), mode `score`." in text
    assert "| tokenizer fingerprint | `?` (vocab ?) |" in text


def test_the_provenance_block_is_the_manifests_sections_as_json(tmp_path):
    m = manifest(teacher={"name_or_path": "t"}, dataset={"name": "d", "filters": {"fraction": 0.5}}, template={"a": 1})
    text = card(tmp_path, m)
    block = text.split("Provenance:\n```json\n", 1)[1].rsplit("\n```\n", 1)
    assert block[1] == ""  # the block ends the card
    assert json.loads(block[0]) == {k: m[k] for k in ("teacher", "tokenizer", "dataset", "extra")}


def test_backticks_in_values_cannot_close_the_code_fence(tmp_path):
    evil = "x\n```\n# Injected heading\n```json"
    m = manifest(teacher={"name_or_path": "t"}, template={"note": evil})
    text = card(tmp_path, m)
    assert [x for x in text.splitlines() if x.startswith("```")] == ["```json", "```"]
    block = text.split("```json\n", 1)[1].rsplit("\n```", 1)[0]
    assert json.loads(block)["extra"]["template"]["note"] == evil  # a JSON escape: the value is intact


@pytest.mark.parametrize(
    "section, key", [("teacher", "name_or_path"), ("dataset", "split"), ("tokenizer", "fingerprint")]
)
def test_pipes_and_backticks_cannot_break_the_table_or_the_inline_code(tmp_path, section, key):
    text = card(tmp_path, manifest(**{section: {key: "a|b`c"}}))
    assert "a|b`c" not in text.split("Provenance:")[0]
    assert "a/b'c" in text


def test_the_command_and_the_creation_time_stay_on_one_line(tmp_path):
    m = manifest()
    m["command"] = "kdcache cache\n# Injected\x1b[2J"
    m["created"] = "now\r\n| row | injected |"
    text = card(tmp_path, m)
    assert line_of(text, "Command: ") == "Command: `kdcache cache\\n# Injected\\x1b[2J`"
    assert line_of(text, "| created |") == "| created | now\\r\\n/ row / injected / |"
    assert "\x1b" not in text and "\r" not in text


def test_a_card_is_replaced_whole_and_leaves_no_temporary_file(tmp_path):
    (tmp_path / "README.md").write_text("a previous, longer card\n" * 1000)
    text = card(tmp_path, manifest())
    assert text.startswith("---\nconfigs:") and "previous" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_the_writer_writes_the_card_of_its_final_manifest(cache, tmp_path):
    (tmp_path / "again").mkdir()
    assert card(tmp_path / "again", load_manifest(cache)) == (cache / "README.md").read_text()
