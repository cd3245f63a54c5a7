"""kdcache's own version, as every artifact it writes records it (a cache's manifest, a student's
model card, `kdcache eval`'s results)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # formats/common/version.py -> the checkout


def kdcache_version() -> str:
    """The installed package's version; from a checkout that is not installed, pyproject.toml's."""
    try:
        return importlib.metadata.version("kdcache")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout
        import tomllib

        return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
