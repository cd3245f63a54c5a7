"""kdcache/bench.py: every benchmark lives beside what it measures and runs as `kdcache bench NAME`."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kdcache import bench as kdcache_bench
from kdcache import cli as kdcache_cli

ROOT = Path(__file__).resolve().parents[2]


def test_no_top_level_bench_package_is_installed():
    """issue 10: benchmark code stays out of the installed top-level namespace (`bench` collides easily)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    top_level = {name.split(".")[0] for name in setuptools["packages"]} | set(setuptools.get("py-modules", []))
    assert top_level == {"formats", "cache_teacher", "train_student", "kdcache"}
    assert not list((ROOT / "bench").glob("*.py"))  # bench/ keeps only the GPU script and data


@pytest.mark.parametrize("name", sorted(kdcache_bench.BENCHES))
def test_each_benchmark_is_registered_with_a_main(name):
    module, _ = kdcache_bench.BENCHES[name]
    if name in ("codec-data", "cache"):
        pytest.importorskip("transformers")
    if name == "kernel-gpu":
        pytest.importorskip("triton")
    assert callable(importlib.import_module(module).main)
    assert kdcache_cli.build_parser().parse_args(["bench", name]).func


@pytest.mark.parametrize("name", sorted(kdcache_bench.BENCHES))
def test_bench_help_reaches_the_benchmarks_own_parser(name, capsys):
    if name == "kernel-gpu":
        pytest.importorskip("triton")
    with pytest.raises(SystemExit) as exit_:
        kdcache_cli.main(["bench", name, "--help"])
    assert exit_.value.code == 0
    assert f"kdcache bench {name}" in capsys.readouterr().out


@pytest.mark.multiprocess
def test_the_gpu_kernel_benchmark_imports_with_torch_and_triton_only():
    """issue 10: `kdcache bench kernel-gpu` and bench/kernel_gpu.sh load no transformers, vLLM or datasets."""
    pytest.importorskip("triton")
    code = (
        "import sys, train_student.kernels.bench_gpu; "
        "print(sorted({'transformers', 'vllm', 'datasets'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.multiprocess
def test_kdcache_help_imports_no_benchmark():
    code = (
        "import sys, kdcache.cli; kdcache.cli.build_parser().format_help(); "
        "print(sorted(m for m in sys.modules if 'bench' in m or m in ('torch', 'transformers', 'vllm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['kdcache.bench']"
