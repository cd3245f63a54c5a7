"""train_student/model_card.py: final/README.md, the student's model card. After a tiny `kdcache train` run it
loads with huggingface_hub's ModelCard.load and names the base model, the cache (path, teacher, the sha256 of
its manifest.json), the KD settings and the held-out metrics; values from a cache's manifest (untrusted) cannot
add keys, lines or markup to it."""

from __future__ import annotations

import hashlib
import json

import pytest

from train_student.__main__ import main as train_main
from train_student.config import Stage, TrainConfig
from train_student.model_card import card_text, eval_rows

from .kd_fixtures import train_args


def _load(path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A 2-step run on the tiny cache (its final/ and README.md)."""
    out = tmp_path_factory.mktemp("card") / "run"
    assert train_main(train_args(tiny["student"], tiny["cache"], out, steps=2, ce_weight=0.25, temperature=2.0)) == 0
    return out


def test_the_final_folder_has_a_model_card_that_huggingface_hub_loads(trained, tiny):
    card = _load(trained / "final" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["tags"] == ["knowledge-distillation", "kdcache"]
    kd = data["kdcache"]
    assert kd["init"]["student"] == str(tiny["student"]) and kd["steps"] == 2
    assert kd["kdcache_version"] and kd["batch"] == {"max_tokens": 64, "grad_accum": 1, "processes": 1}
    assert kd["optimizer"]["lr"] == 3e-3
    (stage,) = kd["stages"]
    assert stage["loss"] | {} == {
        "kd_weight": 1.0,
        "ce_weight": 0.25,
        "temperature": 2.0,
        "kind": "forward_kl",
        "tail": "renormalize",
        "impl": "chunked",
        "chunk_size": 1024,
        "cross_tokenizer": "off",
        "uld_weight": 1.0,
    }
    (cache,) = stage["caches"]
    assert cache["cache"] == str(tiny["cache"]) and cache["teacher"] == "tiny-teacher"
    assert cache["manifest_sha256"] == hashlib.sha256((tiny["cache"] / "manifest.json").read_bytes()).hexdigest()


def test_the_card_holds_the_held_out_metrics_of_the_final_evaluation(trained):
    card = _load(trained / "final" / "README.md")
    final = eval_rows(trained)[-1]
    assert final["step"] == 2
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {
        "kl_divergence": final["kl"],
        "cross_entropy": final["ce"],
        "perplexity": final["ppl"],
        "top1_agreement": final["top1_agreement"],
    }
    assert card.data.to_dict()["kdcache"]["eval"]["kl"] == final["kl"]
    assert card.data.model_name == "run"
    assert "| base model (the student's init) | `" in card.text and "## Held-out evaluation" in card.text


def test_a_run_resumed_after_final_was_lost_writes_the_card_again(trained, tiny):
    import shutil

    shutil.rmtree(trained / "final")
    args = train_args(tiny["student"], tiny["cache"], trained, steps=2, ce_weight=0.25, temperature=2.0)
    assert train_main(args + ["--resume"]) == 0
    assert _load(trained / "final" / "README.md").data.to_dict()["kdcache"]["steps"] == 2


# ---- the card from its parts: a hub student, a hub cache, hostile manifest values -----------------------------
def _record(**values) -> dict:
    record = {
        "cache": "hf://datasets/org/cache",
        "hub_id": "org/cache",
        "manifest_sha256": "a" * 64,
        "teacher": "org/teacher",
        "teacher_revision": "b" * 40,
        "teacher_weights_sha256": "c" * 64,
        "dataset": "allenai/tulu-3-sft-mixture",
        "license": "odc-by",
        "k": 64,
        "mode": "score",
        "examples": 10,
        "positions": 100,
    }
    return record | values


def _card(tmp_path, record: dict, student: str = "org/student-base") -> str:
    cfg = TrainConfig(student=student, out=str(tmp_path / "kd-run"), stages=[Stage(cache=[record["cache"]])])
    cfg.stages[0].name = "stage0"
    (tmp_path / "kd-run").mkdir(exist_ok=True)
    rows = [{"step": 0, "split": "eval", "kl": 2.0, "ce": 3.0, "ppl": 20.1, "top1_agreement": 0.5}]
    rows.append({**rows[0], "step": 9, "kl": 1.0})
    (tmp_path / "kd-run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return card_text(cfg, cfg.stages, ["off"], [[record]], step=9, world=2, run_dir=tmp_path / "kd-run")


def test_a_hub_student_and_a_hub_cache_are_named_as_base_model_and_dataset(tmp_path):
    (tmp_path / "README.md").write_text(_card(tmp_path, _record()))
    card = _load(tmp_path / "README.md")
    assert card.data.base_model == "org/student-base" and card.data.datasets == ["org/cache"]
    assert card.data.to_dict()["kdcache"]["stages"][0]["caches"][0]["teacher_revision"] == "b" * 40
    assert card.data.to_dict()["kdcache"]["batch"]["processes"] == 2
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["kl_divergence"] == 1.0


def test_a_local_student_is_named_in_the_body_not_as_base_model(tmp_path):
    local = tmp_path / "student"
    local.mkdir()
    (tmp_path / "README.md").write_text(_card(tmp_path, _record(), student=str(local)))
    card = _load(tmp_path / "README.md")
    assert card.data.base_model is None and f"| base model (the student's init) | `{local}` |" in card.text


HOSTILE = [
    "x\n---\nlicense: mit\n---",
    "```\n# Injected\n```",
    "a|b`c",
    "{base_model: evil/model}",
    "\x1b[2J\u2028",
    "word " * 30 + "--- base_model: evil/model",
]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
@pytest.mark.parametrize("key", ["teacher", "teacher_revision", "teacher_weights_sha256", "license", "dataset"])
def test_hostile_values_from_a_cache_manifest_cannot_add_keys_lines_or_markup(tmp_path, key, value):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    hostile, benign = _card(tmp_path / "a", _record(**{key: value})), _card(tmp_path / "b", _record(**{key: "v"}))
    (tmp_path / "a" / "README.md").write_text(hostile)
    (tmp_path / "b" / "README.md").write_text(benign)
    a, b = _load(tmp_path / "a" / "README.md").data.to_dict(), _load(tmp_path / "b" / "README.md").data.to_dict()
    assert a.keys() == b.keys() and a["base_model"] == "org/student-base"
    assert a["kdcache"]["stages"][0]["caches"][0].keys() == b["kdcache"]["stages"][0]["caches"][0].keys()
    assert len(hostile.splitlines()) == len(benign.splitlines())
    assert [x for x in hostile.splitlines() if x == "---"] == ["---", "---"]
    assert not any(x.startswith("```") for x in hostile.splitlines())
    assert "a|b`c" not in hostile and not any(c in hostile for c in "\x1b\u2028")
