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
    assert "# Teacher top-k cache (kdcache format v2)" in text
    assert "Top-16 next-token log-probabilities of the teacher **allenai/OLMo-2**\n(vllm 0.32.0, bfloat16)" in text
    assert "of **allenai/tulu-3-sft-mixture** (split `train`), mode `generate`." in text
    assert "| examples | 30 |" in text and "| trained positions | 1234 |" in text
    assert "| rejected input records | 2 (see `rejects.jsonl`) |" in text
    assert "| bytes per position | 114.4 |" in text
    assert "| codec | `kdcache-topk-v2` k=16 mass=0.95 |" in text
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
    assert text.startswith("---\nlicense: unknown\n") and "previous" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_the_writer_writes_the_card_of_its_final_manifest(cache, tmp_path):
    (tmp_path / "again").mkdir()
    assert card(tmp_path / "again", load_manifest(cache)) == (cache / "README.md").read_text()


# ---- the header as huggingface_hub reads it: license, teacher, dataset, kdcache version ----------------------
WEIGHTS = {"model-00001-of-00002.safetensors": "1" * 64, "model-00002-of-00002.safetensors": "2" * 64}
PROVENANCE = dict(
    teacher={
        "name_or_path": "allenai/Llama-3.1-Tulu-3-8B",
        "revision": "main",
        "commit": "a" * 40,
        "weights_sha256": "b" * 64,
        "weight_files": WEIGHTS,
        "engine": "vllm",
        "dtype": "bfloat16",
    },
    dataset={"name": "allenai/tulu-3-sft-mixture", "config": "default", "split": "train", "revision": "c" * 40},
    license={"id": "odc-by", "source": "the dataset card of allenai/tulu-3-sft-mixture"},
    kdcache_version="0.1.0",
)
HEADER_KEYS = {"license", "pretty_name", "tags", "configs", "kdcache", "source_datasets"}


def loaded(tmp_path, m):
    """The card as huggingface_hub loads it (DatasetCard.load: its own YAML block parser)."""
    from huggingface_hub import DatasetCard

    write_card(tmp_path, m)
    return DatasetCard.load(tmp_path / "README.md")


def test_the_header_loads_with_huggingface_hub_and_names_license_teacher_and_dataset(tmp_path):
    data = loaded(tmp_path, manifest(**PROVENANCE)).data.to_dict()
    assert set(data) == HEADER_KEYS
    assert data["license"] == "odc-by" and data["source_datasets"] == ["allenai/tulu-3-sft-mixture"]
    assert data["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": SHARDS}]}]
    kd = data["kdcache"]
    assert kd["teacher"] == {
        "name_or_path": "allenai/Llama-3.1-Tulu-3-8B",
        "revision": "main",
        "commit": "a" * 40,
        "weights_sha256": "b" * 64,
        "weight_files": WEIGHTS,
    }
    assert kd["dataset"] == {"name": "allenai/tulu-3-sft-mixture", "config": "default", "split": "train"} | {
        "revision": "c" * 40
    }
    assert kd["kdcache_version"] == "0.1.0" and kd["format_version"] == 2 and kd["k"] == 16
    assert kd["license_source"] == "the dataset card of allenai/tulu-3-sft-mixture"


def test_the_body_shows_the_provenance_and_how_to_load_it(tmp_path):
    text = card(tmp_path, manifest(**PROVENANCE))
    assert "| teacher revision | `" + "a" * 40 + "` (`main`) |" in text
    assert "| teacher weights sha256 | `" + "b" * 64 + "` (over the weight files: 2," in text
    assert "| dataset revision | `" + "c" * 40 + "` |" in text and "| dataset configuration | `default` |" in text
    assert "| license | odc-by (the dataset card of allenai/tulu-3-sft-mixture) |" in text
    assert "| kdcache version | `0.1.0` |" in text and "| positions per example | 41.1 |" in text
    assert '    rows = datasets.load_dataset("USER/NAME", split="train")' in text
    assert "    kdcache pull USER/NAME caches/this" in text
    assert '    train = KDCacheDataset("caches/this", split="train")' in text


def test_an_unknown_license_is_said_to_be_unknown_never_guessed(tmp_path):
    m = manifest(**{**PROVENANCE, "license": {"id": None, "source": None}})
    assert loaded(tmp_path, m).data.license == "unknown"
    assert line_of(card(tmp_path, m), "| license |").startswith("| license | unknown: none was recorded")


def test_a_manifest_written_before_the_provenance_fields_still_makes_a_card(tmp_path):
    """An old cache: no license, no kdcache_version, a teacher recorded by its path alone."""
    m = manifest(teacher={"name_or_path": "runs/teacher"}, dataset={"name": "rows.jsonl", "split": "train"})
    assert not {"license", "kdcache_version"} & set(m)
    kd = loaded(tmp_path, m).data.to_dict()
    assert kd["license"] == "unknown" and "source_datasets" not in kd
    assert kd["kdcache"]["teacher"] == {"name_or_path": "runs/teacher", "revision": None, "commit": None} | {
        "weights_sha256": None,
        "weight_files": None,
    }
    text = card(tmp_path, m)
    assert "| teacher weights sha256 | not recorded |" in text and "| kdcache version | not recorded |" in text


def test_a_local_dataset_is_not_named_as_a_source_dataset(tmp_path):
    m = manifest(**{**PROVENANCE, "dataset": {"name": "data/rows", "split": "train", "revision": "sha256:" + "d" * 64}})
    assert "source_datasets" not in loaded(tmp_path, m).data.to_dict()


HOSTILE = [
    "x\n---\nlicense: mit\n---",  # close the header, add a key
    "```\n# Injected\n```",  # a code fence
    "a|b`c",  # a table cell, inline code
    "{license: mit, tags: [x]}",  # YAML flow syntax
    "- listitem\n  nested: 1",  # YAML block syntax
    "\x1b[2Jnow\u2028line\r\n",  # terminal control, a unicode line separator
    "word " * 30 + "--- license: mit",  # long, with spaces: YAML would fold it over several lines
]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
@pytest.mark.parametrize(
    "where",
    [
        ("teacher", "name_or_path"),
        ("teacher", "revision"),
        ("teacher", "commit"),
        ("teacher", "weights_sha256"),
        ("dataset", "name"),
        ("dataset", "config"),
        ("dataset", "revision"),
        ("license", "id"),
        ("license", "source"),
        ("kdcache_version",),
        ("weight file name",),
    ],
    ids=lambda w: ".".join(w),
)
def test_hostile_provenance_values_cannot_add_keys_lines_or_markup(tmp_path, value, where):
    """write_card takes any manifest dict (load_manifest refuses most of these before, not all): every value
    reaches the header and the body as one escaped line: the same keys, the same number of lines."""
    m = json.loads(json.dumps(manifest(**PROVENANCE)))
    if where == ("weight file name",):
        m["teacher"]["weight_files"] = {value: "1" * 64}
        benign_files = {"w.safetensors": "1" * 64}
    elif len(where) == 1:
        m[where[0]] = value
    else:
        m[where[0]][where[1]] = value
    benign = json.loads(json.dumps(m).replace(json.dumps(value)[1:-1], "v"))
    if where == ("weight file name",):
        benign["teacher"]["weight_files"] = benign_files
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    hostile_card, benign_card = loaded(tmp_path / "a", m), loaded(tmp_path / "b", benign)
    text = (tmp_path / "a" / "README.md").read_text()
    assert set(hostile_card.data.to_dict()) == set(benign_card.data.to_dict()) <= HEADER_KEYS
    assert hostile_card.data.to_dict()["kdcache"].keys() == benign_card.data.to_dict()["kdcache"].keys()
    assert hostile_card.data.configs == benign_card.data.configs  # the shard list is untouched
    assert len(text.splitlines()) == len((tmp_path / "b" / "README.md").read_text().splitlines())
    assert [x for x in text.splitlines() if x.startswith("```")] == ["```json", "```"]
    assert [x for x in text.splitlines() if x == "---"] == ["---", "---"]
    assert not any(c in text for c in "\x1b\r\u2028")
    assert "a|b`c" not in text.split("Provenance:")[0]


def test_datasets_loads_the_folder_as_the_card_says(cache, tmp_path):
    """The card's snippet on a cache folder: `datasets` reads the listed shards and nothing else (manifest,
    rejects.jsonl and the tokenizer files sit beside them)."""
    datasets = pytest.importorskip("datasets")
    m = load_manifest(cache)
    rows = datasets.load_dataset(str(cache), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert rows.num_rows == m["counts"]["examples"] and len(m["shards"]) > 1
    assert {"id", "input_ids", "target_starts", "target_ends"} <= set(rows.column_names)
