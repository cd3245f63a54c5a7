"""The study end to end: `kdcache demo --quick` (real teacher, real vLLM on the CPU, a real ladder of
trainings, the report), and at tiny scale two-stage KD (a generate-mode cache, then a score-mode cache,
in one `kdcache train`) and two teachers' caches reported side by side by `kdcache report`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "runs" / "test-cache" / "smollm2-135m-instruct"  # shared with tests/cache_teacher


def last_eval(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == "eval"][-1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", "demo", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from formats.tools import verify_cache

    result = verify_cache(out / "cache")
    assert result["examples"] == 16 and result["positions"] > 0
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    from cache_teacher.config import make_config, resolve_auto

    from kdcache.demo import DEMO_DATA, QUICK

    job = dict(dataset=str(DEMO_DATA), max_examples=QUICK.max_examples, max_length=QUICK.max_length)
    auto = resolve_auto(make_config(teacher=str(out / "teacher"), out="x", mode="score", **job))  # its job size
    assert manifest["mode"] == "score"  # teacher-forced on the shipped Tulu 3 sample's human responses
    assert manifest["dataset"]["name"].endswith("kdcache/demo_data/tulu3_sft_sample.jsonl")
    assert (manifest["teacher"]["engine"], manifest["teacher"]["dtype"]) == (auto.engine, auto.dtype)
    assert manifest["license"] == {"id": "odc-by", "source": "--license"}  # the shipped sample's (ODC-BY-1.0)
    assert len(manifest["teacher"]["weights_sha256"]) == 64 and manifest["teacher"]["weight_files"]

    import torch
    from transformers import AutoModelForCausalLM

    runs = {name: out / "runs" / name for name in ("kd-f0.5-s0", "sft-f0.5-s0", "kd-f1-s0", "sft-f1-s0")}
    finals = {}
    for name, run in runs.items():
        model = AutoModelForCausalLM.from_pretrained(run / "final")  # saved in HF format, loads back
        assert model.config.num_hidden_layers == 3
        finals[name] = model.state_dict()["model.layers.1.mlp.down_proj.weight"]
        (stage,) = json.loads((run / "config.json").read_text())["stages"]
        assert stage["fraction"] == (0.5 if "f0.5" in name else 1.0)
        assert stage["kd_weight"] == (1.0 if "kd" in name else 0.0)
    assert not torch.equal(finals["kd-f1-s0"], finals["sft-f1-s0"])  # different trainings happened
    # the nested subsample: half the data gives fewer steps (1 epoch each)
    assert last_eval(runs["kd-f0.5-s0"])["step"] < last_eval(runs["kd-f1-s0"])["step"]

    study = json.loads((out / "study" / "report.json").read_text())
    report = (out / "report.md").read_text()
    assert len(study["groups"]) == 4 and study["factors"] == []
    for name, run in runs.items():  # the report holds each run's measured held-out CE (one seed: mean = it)
        g = [g for g in study["groups"] if g["runs"] == [str(run)]][0]
        assert g["metrics"]["ce"]["mean"] == last_eval(run)["ce"]
        assert f"{last_eval(run)['ce']:.4f} ± — (n=1)" in report
    ce = {d["data_fraction"]: d["kd_minus_sft"] for d in study["differences"] if d["metric"] == "ce"}
    assert ce[1.0] == pytest.approx(last_eval(runs["kd-f1-s0"])["ce"] - last_eval(runs["sft-f1-s0"])["ce"])
    assert f"fraction 1: KD − SFT = {ce[1.0]:+.4f}" in report
    assert "SmolLM2-135M-Instruct" in report and "bytes/position" in report and "configs/paper" in report
    png = out / "study" / "study.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "## What the numbers show" in proc.stdout


def tiny_student(teacher: Path, out: Path) -> Path:
    """A random 2-layer Llama (hidden 64) with the teacher's tokenizer and vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(teacher)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_two_stage_and_two_teachers_end_to_end(tmp_path):
    from cache_teacher.prepare_teacher import prepare_teacher
    from formats.errors import InputError
    from kdcache.cli import main
    from kdcache.demo import DEMO_DATA
    from kdcache.demo_prompts import write_prompts
    from kdcache.study.plot import study_figure

    try:
        teacher = prepare_teacher("smollm2-135m-instruct", TEACHER)
    except InputError as exc:
        pytest.skip(str(exc))
    common = ["--teacher", str(teacher), "--engine", "hf", "--k", "8", "--max-length", "128", "--no-progress"]
    gen = tmp_path / "gen"  # stage 1 data: the teacher answers prompts (generate mode)
    assert (
        main(
            [
                "cache",
                *common,
                "--dtype",
                "float32",
                "--mode",
                "generate",
                "--n",
                "1",
                "--max-new-tokens",
                "12",
                "--dataset",
                str(write_prompts(tmp_path / "prompts.jsonl", 8)),
                "--out",
                str(gen),
            ]
        )
        == 0
    )
    score = {}  # stage 2 data, and the two "teachers": the same model scoring in float32 and in bfloat16
    for dtype in ("float32", "bfloat16"):
        score[dtype] = tmp_path / f"score-{dtype}"
        assert (
            main(
                [
                    "cache",
                    *common,
                    "--dtype",
                    dtype,
                    "--dataset",
                    str(DEMO_DATA),
                    "--max-examples",
                    "12",
                    "--out",
                    str(score[dtype]),
                ]
            )
            == 0
        )
    student = tiny_student(teacher, tmp_path / "student")
    train = [
        "--student",
        str(student),
        "--max-tokens",
        "128",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "1",
        "--eval-fraction",
        "0.25",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--log-every",
        "1",
        "--dtype",
        "float32",
        "--no-progress",
        "--no-tensorboard",
    ]

    two = tmp_path / "runs" / "two-stage"
    cfg = tmp_path / "two_stage.yaml"
    cfg.write_text(f"""stages:
  - {{name: synthetic, cache: [{gen}], steps: 3, epochs: 0, kd_weight: 1.0}}
  - {{name: human, cache: [{score["float32"]}], steps: 3, epochs: 0, kd_weight: 1.0}}
""")
    assert main(["train", "--config", str(cfg), *train, "--out", str(two)]) == 0
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows if r["split"] == "train"] == [
        ("synthetic", 1),
        ("synthetic", 2),
        ("synthetic", 3),
        ("human", 4),
        ("human", 5),
        ("human", 6),
    ]
    assert (two / "final" / "config.json").exists()

    singles = {}
    for dtype, cache in score.items():
        for loss, kd in (("kd", "1"), ("sft", "0")):
            run = singles[dtype, loss] = tmp_path / "runs" / f"{loss}-{dtype}"
            assert (
                main(
                    [
                        "train",
                        *train,
                        "--cache",
                        str(cache),
                        "--steps",
                        "4",
                        "--epochs",
                        "0",
                        "--kd-weight",
                        kd,
                        "--ce-weight",
                        str(1 - int(kd)),
                        "--out",
                        str(run),
                    ]
                )
                == 0
            )
    # SFT never reads the teacher's top-k: the same tokens give the same student whichever teacher's cache
    assert last_eval(singles["float32", "sft"])["ce"] == pytest.approx(
        last_eval(singles["bfloat16", "sft"])["ce"], abs=1e-5
    )

    rep = tmp_path / "report"
    assert main(["report", str(two), *map(str, singles.values()), "--out", str(rep)]) == 0
    study = json.loads((rep / "report.json").read_text())
    assert {"teacher", "stages"} <= set(study["factors"])
    label = {dtype: f"smollm2-135m-instruct {dtype} k=8" for dtype in score}
    for (dtype, loss), run in singles.items():
        [g] = [g for g in study["groups"] if g["runs"] == [str(run)]]
        assert (g["series"]["teacher"], g["series"]["stages"], g["loss"]) == (label[dtype], "score", loss.upper())
        assert g["metrics"]["ce"]["mean"] == last_eval(run)["ce"]
    [g] = [g for g in study["groups"] if g["runs"] == [str(two)]]
    assert (g["series"]["stages"], g["loss"]) == ("generate → score", "KD → KD")
    assert g["series"]["teacher"] == f"{label['float32']} → {label['float32']}"
    diffs = {d["series"]["teacher"]: d["kd_minus_sft"] for d in study["differences"] if d["metric"] == "kl"}
    for dtype in score:  # side by side: one KD − SFT per teacher
        assert diffs[label[dtype]] == pytest.approx(
            last_eval(singles[dtype, "kd"])["kl"] - last_eval(singles[dtype, "sft"])["kl"]
        )
    fig = study_figure(study)
    assert all(len(ax.containers) == 5 for ax in fig.axes if ax.get_visible())  # {KD, SFT} x 2 teachers + two-stage
    assert "bfloat16 k=8" in (rep / "report.md").read_text()
