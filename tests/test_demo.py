"""`kdcache demo --quick` end to end: real teacher, real vLLM on the CPU, two real trainings."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "kdcache.cli", "demo", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from formats.tools import verify_cache

    result = verify_cache(out / "cache")
    assert result["examples"] > 0 and result["positions"] > 0
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    from cache_teacher.config import make_config, resolve_auto

    auto = resolve_auto(make_config(teacher=str(out / "teacher"), out="x", mode="generate"))
    assert manifest["mode"] == "generate"  # the engine and dtype are this machine's defaults, recorded as such
    assert (manifest["teacher"]["engine"], manifest["teacher"]["dtype"]) == (auto.engine, auto.dtype)

    import torch
    from transformers import AutoModelForCausalLM

    finals = {}
    for run in ("kd", "sft"):
        final = out / run / "final"
        model = AutoModelForCausalLM.from_pretrained(final)  # saved in HF format, loads back
        assert model.config.num_hidden_layers == 3
        finals[run] = model.state_dict()["model.layers.1.mlp.down_proj.weight"]
        evals = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line).get("split") == "eval"]
        assert len(evals) >= 2 and evals[-1]["step"] > evals[0]["step"]
    assert not torch.equal(finals["kd"], finals["sft"])  # two different trainings happened

    report = (out / "report.md").read_text()
    png = out / "loss_curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the report holds the measured numbers: the final held-out KL of each run, as printed
    for run in ("kd", "sft"):
        kl = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("split") == "eval"][-1]["kl"]
        assert f"{kl:.3f}" in report
    assert "SmolLM2-135M-Instruct" in report and "bytes/position" in report
    assert re.search(r"\| KD after \d+ steps \|", proc.stdout)
