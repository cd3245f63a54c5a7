"""`kdcache train --dtype auto` (the default): bf16-mixed only where the device computes bf16 natively."""

from __future__ import annotations

import json

import pytest

from formats.common import hardware
from train_student.config import TrainConfig, make_config
from train_student.train import run


@pytest.mark.parametrize(
    "flags, expected",
    [("avx2 fma", "float32"), ("avx2 avx512f avx512_bf16", "bf16-mixed"), ("avx2 avx512f amx_bf16", "bf16-mixed")],
)
def test_auto_dtype_follows_native_bf16_and_is_recorded(tiny, tmp_path, monkeypatch, flags, expected):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU rule")
    assert TrainConfig.dtype == "auto"
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: ("Test CPU", frozenset(flags.split())))
    for name in hardware.ISA_CAP_VARIABLES:  # the suite may run under an emulated AVX2-only machine
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    cfg = make_config(
        student=str(tiny["student"]),
        cache=[str(tiny["cache"])],
        out=str(out),
        steps=1,
        max_tokens=64,
        eval_every=0,
        save_every=0,
        log_every=1,
        tensorboard=False,
        progress=False,
    )
    assert run(cfg) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == expected
