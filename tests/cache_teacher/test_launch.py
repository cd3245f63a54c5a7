"""cache_teacher.launch: N worker slices as Ray tasks on a local Ray (2 CPUs), merged into one cache."""

from __future__ import annotations

import numpy as np
import pytest

from cache_teacher.export_sft import iter_cache
from cache_teacher.launch import launch_ray, worker_dirs
from cache_teacher.run import run_cache
from formats.manifest import load_manifest

from .teacher_helpers import make_config, write_jsonl

pytestmark = pytest.mark.slow


def test_ray_launcher_two_workers_equals_one_process(tiny_dir, sample_rows, tmp_path):
    pytest.importorskip("ray")
    path = write_jsonl(tmp_path / "rows.jsonl", sample_rows[:16] + [{"id": "bad", "messages": []}])
    config = make_config(
        teacher=str(tiny_dir),
        dataset=str(path),
        out=str(tmp_path / "merged"),
        launcher="ray",
        num_workers=2,
        cpus_per_worker=1,
    )
    summary = launch_ray(config)
    print(summary.report())
    assert all((d / "manifest.json").exists() for d in worker_dirs(config))
    manifest = load_manifest(tmp_path / "merged")
    assert manifest["counts"]["examples"] == 16 and manifest["counts"]["rejects"] == 1
    assert summary.inputs == 17 and summary.examples == 16

    single = make_config(teacher=str(tiny_dir), dataset=str(path), out=str(tmp_path / "single"))
    run_cache(single)
    a = {ex.id: ex for ex in iter_cache(tmp_path / "merged")}
    b = {ex.id: ex for ex in iter_cache(tmp_path / "single")}
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key].input_ids, b[key].input_ids)
        assert np.array_equal(a[key].target_positions, b[key].target_positions)
        assert np.array_equal(a[key].topk_ids[:, 0], b[key].topk_ids[:, 0])
