"""kdcache.study.report: `kdcache report` over run folders with known metrics -> the known means, stds,
KD − SFT differences and the paper's figure; broken run folders -> an error naming the file."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import numpy as np
import pytest

from formats.errors import InputError
from tests.formats.format_helpers import PROVENANCE, make_example, write_cache
from train_student.config import make_config
from kdcache.study.report import study, describe_run, write_report

FRACTIONS = (0.25, 1.0)
SEEDS = (0, 1, 2)


def make_cache(path, *, dtype="bfloat16", k=8, n=10, mode="score"):
    rng = np.random.default_rng(0)
    prov = {**PROVENANCE, "teacher": {**PROVENANCE["teacher"], "dtype": dtype}, "mode": mode}
    write_cache(path, [make_example(rng, i, k=k) for i in range(n)], k=k, provenance=prov)
    return path


def known_ce(loss: str, frac: float, seed: int, teacher: int = 0) -> float:
    """Held-out CE of a fabricated run: KD beats SFT by 0.1 at fraction 0.25 and loses by 0.05 at 1.0."""
    base = 3.0 - 0.5 * math.log2(frac / 0.25) / 2 + 0.3 * teacher
    gap = {0.25: -0.1, 1.0: 0.05}[frac] if loss == "KD" else 0.0
    return base + gap + 0.01 * seed * (1 + (loss == "KD"))


def fake_run(
    root,
    name,
    cache,
    *,
    loss="KD",
    frac=1.0,
    seed=0,
    ce=3.0,
    kl=None,
    top1=0.5,
    max_examples=None,
    stages=None,
    eval_tasks=None,
):
    run = root / name
    run.mkdir(parents=True)
    kd = 1.0 if loss == "KD" else 0.0
    if stages:
        cfg = make_config(student="s", seed=seed, out=str(run), stages=stages)
    else:
        cfg = make_config(
            student="s",
            cache=[str(cache)],
            kd_weight=kd,
            ce_weight=1.0 - kd,
            fraction=frac,
            seed=seed,
            out=str(run),
            max_examples=max_examples,
        )
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    rows = [
        {"step": 5, "stage": "stage0", "split": "train", "loss": 1.0, "tokens": 100, "tokens_per_s": 50.0},
        {
            "step": 5,
            "stage": "stage0",
            "split": "eval",
            "kl": ce - 2.5 if kl is None else kl,
            "ce": ce,
            "ppl": math.exp(ce),
            "top1_agreement": top1,
        },
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if eval_tasks:
        (run / "eval").mkdir()
        (run / "eval" / "results.json").write_text(
            json.dumps(
                {
                    "model_path": str(run / "final"),
                    "model_sha256": "0" * 64,
                    "lm_eval_version": "0.4.13",
                    "kdcache_version": "0.1.0",
                    "dtype": "float32",
                    "tasks": {
                        t: {
                            "metrics": m,
                            "stderr": {k: None for k in m},
                            "version": 1,
                            "n_samples": 10,
                            "task_config_sha256": "1" * 64,
                        }
                        for t, m in eval_tasks.items()
                    },
                }
            )
        )
    return run


@pytest.fixture
def ladder(tmp_path):
    """2 fractions x {KD, SFT} x 3 seeds on one cache, with known held-out CE."""
    cache = make_cache(tmp_path / "cache")
    runs = [
        fake_run(
            tmp_path / "runs",
            f"{loss}-{frac}-s{seed}",
            cache,
            loss=loss,
            frac=frac,
            seed=seed,
            ce=known_ce(loss, frac, seed),
            top1=0.4 + 0.1 * seed,
        )
        for frac in FRACTIONS
        for loss in ("KD", "SFT")
        for seed in SEEDS
    ]
    return tmp_path, runs


def group(report, loss, frac, **series):
    [g] = [
        g
        for g in report["groups"]
        if g["loss"] == loss and g["data_fraction"] == frac and all(g["series"][k] == v for k, v in series.items())
    ]
    return g


def test_report_shows_the_known_means_stds_and_kd_minus_sft(ladder):
    root, runs = ladder
    md = write_report([str(r) for r in runs], root / "report").read_text()
    report = json.loads((root / "report" / "report.json").read_text())
    assert report["runs"] == 12 and report["factors"] == []  # loss and data are the only differences
    for frac in FRACTIONS:
        for loss in ("KD", "SFT"):
            values = [known_ce(loss, frac, s) for s in SEEDS]
            g = group(report, loss, frac)
            assert g["seeds"] == list(SEEDS)
            assert g["metrics"]["ce"]["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert g["metrics"]["ce"]["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
            assert g["metrics"]["ce"]["n"] == 3
            assert g["metrics"]["top1_agreement"]["mean"] == pytest.approx(0.5)
            assert f"{g['metrics']['ce']['mean']:.4f} ± {g['metrics']['ce']['std']:.4f} (n=3)" in md
    diffs = {d["data_fraction"]: d for d in report["differences"] if d["metric"] == "ce"}
    # KD seeds spread twice as far as SFT seeds: std 0.02 vs 0.01, so se = sqrt((0.02² + 0.01²) / 3)
    se = math.sqrt((0.02**2 + 0.01**2) / 3)
    assert diffs[0.25]["kd_minus_sft"] == pytest.approx(-0.1 + 0.01, abs=1e-12)
    assert diffs[1.0]["kd_minus_sft"] == pytest.approx(0.05 + 0.01, abs=1e-12)
    for d in diffs.values():
        assert d["stderr"] == pytest.approx(se, abs=1e-12) and (d["n_kd"], d["n_sft"]) == (3, 3)
    assert f"| 0.25 | held-out CE | -0.0900 | {se:.4f} | 3 | 3 |" in md
    assert "![metric vs training-data fraction](study.png)" in md
    png = root / "report" / "study.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_seed_groups_have_no_std_and_no_stderr(tmp_path):
    cache = make_cache(tmp_path / "cache")
    runs = [fake_run(tmp_path, loss, cache, loss=loss, ce=ce) for loss, ce in (("KD", 2.0), ("SFT", 2.5))]
    s = study([describe_run(r) for r in runs])
    assert group(s, "KD", 1.0)["metrics"]["ce"] == {"mean": 2.0, "std": None, "n": 1}
    [d] = [d for d in s["differences"] if d["metric"] == "ce"]
    assert d["kd_minus_sft"] == pytest.approx(-0.5) and d["stderr"] is None


def test_eval_task_metrics_are_reported_per_group(tmp_path):
    cache = make_cache(tmp_path / "cache")
    runs = [
        fake_run(
            tmp_path, f"{loss}{seed}", cache, loss=loss, seed=seed, eval_tasks={"kdcache_heldout_chat": {"acc": acc}}
        )
        for loss, seed, acc in (("KD", 0, 0.6), ("KD", 1, 0.8), ("SFT", 0, 0.5), ("SFT", 1, 0.5))
    ]
    s = study([describe_run(r) for r in runs])
    assert "kdcache_heldout_chat acc" in s["metrics"]
    kd = group(s, "KD", 1.0)["metrics"]["kdcache_heldout_chat acc"]
    assert kd["mean"] == pytest.approx(0.7) and kd["std"] == pytest.approx(math.sqrt(0.02))
    [d] = [d for d in s["differences"] if d["metric"] == "kdcache_heldout_chat acc"]
    assert d["kd_minus_sft"] == pytest.approx(0.2) and d["stderr"] == pytest.approx(math.sqrt(0.02 / 2))


def test_teachers_are_told_apart_and_the_figure_has_a_line_per_loss_and_teacher(tmp_path):
    from kdcache.study.plot import study_figure

    caches = [make_cache(tmp_path / "bf16", dtype="bfloat16"), make_cache(tmp_path / "fp32", dtype="float32", k=4)]
    runs = [
        fake_run(
            tmp_path / "runs",
            f"t{t}-{loss}-{frac}-s{seed}",
            caches[t],
            loss=loss,
            frac=frac,
            seed=seed,
            ce=known_ce(loss, frac, seed, teacher=t),
        )
        for t in (0, 1)
        for frac in FRACTIONS
        for loss in ("KD", "SFT")
        for seed in (0, 1)
    ]
    s = study([describe_run(r) for r in runs])
    assert s["factors"] == ["teacher"]
    labels = {"unit-teacher bfloat16 k=8", "unit-teacher float32 k=4"}
    assert {g["series"]["teacher"] for g in s["groups"]} == labels
    g = group(s, "SFT", 0.25, teacher="unit-teacher float32 k=4")
    assert g["metrics"]["ce"]["mean"] == pytest.approx(statistics.fmean([known_ce("SFT", 0.25, x, 1) for x in (0, 1)]))
    assert len([d for d in s["differences"] if d["metric"] == "ce"]) == 4  # 2 teachers x 2 fractions
    fig = study_figure(s)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 3  # CE, KL, top-1
    for ax in panels:
        assert len(ax.containers) == 4 and ax.get_xscale() == "log"  # {KD, SFT} x 2 teachers
        for c in ax.containers:
            assert list(c.lines[0].get_xdata()) == list(FRACTIONS)


def test_max_examples_is_a_data_fraction_of_the_cache(tmp_path):
    cache = make_cache(tmp_path / "cache", n=10)
    r = describe_run(fake_run(tmp_path, "r", cache, frac=0.5, max_examples=4))
    assert r.data_fraction == pytest.approx(0.5 * 4 / 10)


def test_two_stage_runs_are_described_by_their_caches_modes(tmp_path):
    gen, score = make_cache(tmp_path / "gen", mode="generate"), make_cache(tmp_path / "score")
    stages = [
        {"cache": [str(gen)], "kd_weight": 1.0, "ce_weight": 0.0, "steps": 3},
        {"cache": [str(score)], "kd_weight": 1.0, "ce_weight": 0.0, "steps": 3, "fraction": 0.5},
    ]
    two = describe_run(fake_run(tmp_path, "two", score, stages=stages))
    one = describe_run(fake_run(tmp_path, "one", score))
    assert two.factors["stages"] == "generate → score" and one.factors["stages"] == "score"
    assert two.loss == "KD → KD" and two.data_fraction == 0.5
    assert "stages" in study([two, one])["factors"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda run: (run / "metrics.jsonl").write_text('{"step": 1, "split": "eval"}\n{"step": 2, "spl'),
            "metrics.jsonl: line 2 is not valid JSON",
        ),
        (lambda run: (run / "metrics.jsonl").write_text("[1, 2]\n"), "metrics.jsonl: line 1 is not a metrics row"),
        (
            lambda run: (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "tokens": 1}\n'),
            "metrics.jsonl: no evaluation row",
        ),
        (lambda run: (run / "metrics.jsonl").unlink(), "no metrics.jsonl"),
        (lambda run: (run / "config.json").unlink(), "config.json: missing"),
        (lambda run: (run / "config.json").write_bytes(b"\xff{"), "config.json: not valid JSON"),
        (
            lambda run: (run / "eval").mkdir() or (run / "eval" / "results.json").write_text('{"tasks": {"t": 3}}'),
            "results.json: task 't' has no `metrics` object",
        ),
    ],
)
def test_a_broken_run_folder_is_an_error_naming_the_file(tmp_path, damage, message):
    cache = make_cache(tmp_path / "cache")
    good = fake_run(tmp_path, "good", cache)
    bad = fake_run(tmp_path, "bad", cache)
    damage(bad)
    with pytest.raises(InputError, match="bad") as err:
        write_report([str(good), str(bad)], tmp_path / "report")
    assert message in str(err.value)
    assert not (tmp_path / "report" / "report.md").exists()


def test_a_run_whose_cache_is_gone_names_the_cache(tmp_path):
    run = fake_run(tmp_path, "r", tmp_path / "deleted-cache")
    with pytest.raises(InputError, match="deleted-cache.*no manifest.json"):
        describe_run(run)


def test_kdcache_report_cli_prints_the_report(ladder, capsys):
    from kdcache.cli import main

    root, runs = ladder
    assert main(["report", *map(str, runs), "--out", str(root / "cli")]) == 0
    assert "## KD − SFT" in capsys.readouterr().out
    assert (root / "cli" / "study.png").exists() and (root / "cli" / "loss_curves.png").exists()
