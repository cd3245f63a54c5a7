"""The sha256 of a model's weight files: how a cache's manifest names its teacher's exact weights
(`teacher.weight_files`, `teacher.weights_sha256`) and how `kdcache eval` keys its results
(`model_sha256`): the same digest for the same folder."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from formats.errors import InputError
from formats.manifest import sha256_file

# What a checkpoint's weights are stored in (safetensors, PyTorch pickles, GGUF): every such file counts.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weight_files(model_dir: Path | str) -> list[Path]:
    """The weight files directly in `model_dir` (an HF checkpoint keeps them at its top level), sorted."""
    return sorted(p for p in Path(model_dir).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def weight_file_hashes(model_dir: Path | str) -> dict[str, str]:
    """{file name: sha256} of the weight files of `model_dir`, streamed (never the whole file in memory),
    computed once per process for files of unchanged size and modification time. InputError when there
    are none."""
    files = weight_files(model_dir)
    if not files:
        raise InputError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    stats = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return dict(zip((p.name for p in files), _hashes(stats)))


@lru_cache(maxsize=256)
def _hashes(stats: tuple) -> tuple[str, ...]:
    return tuple(sha256_file(path) for path, _, _ in stats)


def combined_sha256(hashes: dict[str, str]) -> str:
    """One digest over {file name: sha256} (names sorted): changes iff a weight file's name or bytes do."""
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}\0{hashes[name]}\n".encode())
    return h.hexdigest()


def weights_sha256(model_dir: Path | str) -> str:
    """sha256 over the model's weight files (name and sha256 of each, sorted): changes iff the weights do."""
    return combined_sha256(weight_file_hashes(model_dir))
