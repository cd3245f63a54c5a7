"""formats/common/version.py: kdcache's version, from the installed package, else from pyproject.toml."""

from __future__ import annotations

import importlib.metadata
import tomllib

from formats.common import version


def test_the_installed_version_is_the_projects():
    expected = tomllib.loads((version.REPO / "pyproject.toml").read_text())["project"]["version"]
    assert version.kdcache_version() == expected


def test_a_checkout_that_is_not_installed_reads_pyproject(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert (
        version.kdcache_version() == tomllib.loads((version.REPO / "pyproject.toml").read_text())["project"]["version"]
    )
