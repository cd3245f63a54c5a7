"""The trainer drives impl="fused" end to end: the Triton kernel in place of the chunked loss.

There is no GPU in CI, so the kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1 in the
training subprocess only); the run must match impl=chunked step for step.
"""

import json

import pytest

from .kd_fixtures import python_env, run_train, train_args

pytest.importorskip("triton")


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") == "train"]


@pytest.mark.multiprocess
def test_trainer_runs_the_fused_kernel(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the training subprocess via python_env()
    assert python_env()["TRITON_INTERPRET"] == "1"
    runs = {}
    for impl in ("chunked", "fused"):
        out = tmp_path / impl
        r = run_train(
            train_args(tiny["student"], tiny["cache"], out, steps=3, impl=impl, max_tokens=48, eval_fraction=0.0),
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs[impl] = _losses(out)
    assert len(runs["fused"]) == 3
    assert runs["fused"] == pytest.approx(runs["chunked"], rel=2e-4)
