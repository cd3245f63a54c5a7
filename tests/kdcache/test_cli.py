"""Errors a new user is likely to hit come out as one clear line, not a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def kdcache(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "kdcache.cli", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=300,
    )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only message")
@pytest.mark.multiprocess
def test_fused_without_gpu_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdcache.cli",
            "train",
            "--cache",
            str(tmp_path / "c"),
            "--student",
            str(tmp_path / "s"),
            "--out",
            str(tmp_path / "o"),
            "--impl",
            "fused",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**env, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert r.returncode == 1
    assert "--impl chunked" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.multiprocess
def test_missing_dataset_and_cache(tmp_path):
    r = kdcache("cache", "--teacher", tmp_path / "t", "--dataset", tmp_path / "nope.jsonl", "--out", tmp_path / "c")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "nope.jsonl" in r.stderr
    r = kdcache("verify", tmp_path / "missing-cache")
    assert r.returncode == 1 and "no manifest.json" in r.stderr


def test_the_entry_point_and_the_package_layout():
    """`kdcache` is kdcache.cli:main, the package ships its demo data, and the stages stay apart: only
    kdcache/ (the demo, the CLI) imports both cache_teacher and train_student."""
    import ast
    import importlib
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, func = project["project"]["scripts"]["kdcache"].split(":")
    assert callable(getattr(importlib.import_module(module), func))
    assert "kdcache" in project["tool"]["setuptools"]["packages"]
    assert "kdcache.demo_data" in project["tool"]["setuptools"]["packages"]  # tests/test_packaging.py: in the wheel
    data = ROOT / "kdcache" / "demo_data"
    assert (data / "tulu3_sft_sample.jsonl").exists() and "ODC-BY-1.0" in (data / "README.md").read_text()

    def imported(package: str) -> set[str]:
        names = set()
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    names.add(node.module.split(".")[0])
                elif isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
        return names

    assert "cache_teacher" not in imported("train_student")
    assert "train_student" not in imported("cache_teacher")
    # the packages form a DAG: formats <- the two stages <- kdcache (the CLI and the demo)
    for package in ("formats", "cache_teacher", "train_student"):
        assert "kdcache" not in imported(package), package
    assert not {"cache_teacher", "train_student"} & imported("formats")
    # formats/common/ is the bottom of the bottom: the shared utilities import no module of the contract but its errors
    common = set()
    for path in (ROOT / "formats" / "common").glob("*.py"):
        common |= {
            n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and n.module
        }
    contract = {m for m in common if m.startswith("formats") and not m.startswith("formats.common.")}
    assert contract <= {"formats.errors"}, common
    # every package folder ships (a wing left out of pyproject.toml would be missing from the wheel)
    folders = {
        p.parent.relative_to(ROOT).as_posix().replace("/", ".")
        for p in ROOT.glob("*/**/__init__.py")
        if p.relative_to(ROOT).parts[0] in ("formats", "cache_teacher", "train_student", "kdcache")
    }
    assert folders <= set(project["tool"]["setuptools"]["packages"]), folders - set(
        project["tool"]["setuptools"]["packages"]
    )


def test_python_dash_m_kdcache_is_the_cli():
    r = subprocess.run([sys.executable, "-m", "kdcache", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "export" in r.stdout and "train" in r.stdout
