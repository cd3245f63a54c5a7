"""Integration (slow): the real pipeline on the SmolLM2 teacher: `kdcache cache` (hf engine) on Tulu
rows, then `kdcache train` of a layer-pruned copy; held-out KL to the teacher must drop."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .kd_fixtures import REPO, read_metrics

pytestmark = pytest.mark.slow

SAMPLE = Path(os.environ.get("KDCACHE_TULU_SAMPLE", REPO.parent / "shared" / "data" / "tulu3_sft_sample.jsonl"))
TEACHER = REPO / "runs" / "test-cache" / "smollm2-135m-instruct"  # shared with tests/cache_teacher


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    if not SAMPLE.exists():
        pytest.skip(f"Tulu sample {SAMPLE} not found (set KDCACHE_TULU_SAMPLE)")
    from cache_teacher.prepare_teacher import prepare_teacher
    from formats.errors import InputError

    try:
        teacher = prepare_teacher("smollm2-135m-instruct", TEACHER)
    except InputError as exc:
        pytest.skip(str(exc))
    import kdcache.cli as kdcache_cli

    out = tmp_path_factory.mktemp("smollm2") / "cache"
    rc = kdcache_cli.main(
        [
            "cache",
            "--teacher",
            str(teacher),
            "--engine",
            "hf",
            "--dtype",
            "float32",
            "--dataset",
            str(SAMPLE),
            "--max-examples",
            "24",
            "--max-length",
            "160",
            "--k",
            "32",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0 and (out / "manifest.json").exists()
    return teacher, out


def test_pruned_smollm2_student_lowers_heldout_kl(smollm2_cache, tmp_path):
    from train_student.__main__ import main

    teacher, cache = smollm2_cache
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--init-from-teacher",
            str(teacher),
            "--keep-layers",
            "0,29",
            "--cache",
            str(cache),
            "--steps",
            "6",
            "--epochs",
            "0",
            "--max-tokens",
            "512",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "1",
            "--eval-fraction",
            "0.2",
            "--eval-every",
            "0",
            "--log-every",
            "1",
            "--out",
            str(out),
            "--no-progress",
            "--no-tensorboard",
        ]
    )
    assert rc == 0
    evals = [r for r in read_metrics(out) if r["split"] == "eval"]
    assert evals[0]["targets"] > 50
    assert evals[-1]["kl"] < 0.8 * evals[0]["kl"], json.dumps(evals)
