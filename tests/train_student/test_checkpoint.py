"""Checkpoint files: loaded with torch.load(weights_only=True) only, RNG states round-trip as plain types."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from formats.errors import FormatError, InputError
from train_student import checkpoint

from .kd_fixtures import make_model

RAN = []


class _Payload:
    """Unpickling this runs code: what a tampered checkpoint would carry."""

    def __reduce__(self):
        return (RAN.append, ("payload ran",))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    torch.save({"step": 3, "ranks": [{"data": _Payload()}]}, tmp_path / "trainer.pt")
    with pytest.raises(InputError, match="trainer.pt.*refused"):
        checkpoint.load_trainer_state(tmp_path)
    assert RAN == []


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # numpy keeps a cached gaussian: part of the state
    torch.save({"ranks": [{"rng": checkpoint.rng_state()}]}, tmp_path / "trainer.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.set_rng_state(checkpoint.load_trainer_state(tmp_path)["ranks"][0]["rng"])
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


# ---- sharded checkpoints (torch.distributed.checkpoint) -----------------------------------------------
def _trained_model(seed: int):
    lm = make_model(seed=seed)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    torch.manual_seed(seed)
    for _ in range(2):
        lm(input_ids=torch.randint(0, 200, (1, 12)), labels=torch.randint(0, 200, (1, 12))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return lm, optimizer, scheduler


def _save_sharded(run_dir, lm, optimizer, scheduler, *, last: bool = False):
    return checkpoint.save(
        run_dir,
        step=2,
        lm=lm,
        module=lm,
        optimizer=optimizer,
        scheduler=scheduler,
        tokenizer=None,
        rank_state={"data": None},
        trainer_state={"world_size": 1},
        keep=2,
        sharded=True,
        last=last,
    )


def _resume(ckpt, seed: int = 7):
    lm = make_model(seed=seed)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    checkpoint.load_model_and_optimizer(ckpt, checkpoint.load_trainer_state(ckpt), lm, optimizer, fsdp=False)
    return lm, optimizer


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sharded")
    lm, optimizer, scheduler = _trained_model(seed=3)
    return _save_sharded(run_dir, lm, optimizer, scheduler), lm, optimizer


def test_a_sharded_checkpoint_round_trips_model_and_optimizer(sharded_ckpt):
    ckpt, lm, optimizer = sharded_ckpt
    assert checkpoint.is_sharded(ckpt) and (ckpt / "sharded" / ".metadata").is_file()
    assert list((ckpt / "sharded").glob("__0_*.distcp")) and (ckpt / "model" / "config.json").is_file()
    assert not list((ckpt / "model").glob("*.safetensors"))  # no gathered weights before the last checkpoint
    state = checkpoint.load_trainer_state(ckpt)
    assert "optimizer" not in state and set(state["sharded_files"]) == {p.name for p in (ckpt / "sharded").iterdir()}
    assert checkpoint.student_weights(ckpt, "SOURCE") == "SOURCE"
    got, got_optimizer = _resume(ckpt)
    for (name, a), b in zip(lm.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), name
    want, have = optimizer.state_dict()["state"], got_optimizer.state_dict()["state"]
    assert want.keys() == have.keys()
    for i in want:
        assert all(torch.equal(want[i][key], have[i][key]) for key in ("exp_avg", "exp_avg_sq", "step"))


def test_the_last_sharded_checkpoint_also_holds_hf_weights(tmp_path):
    lm, optimizer, scheduler = _trained_model(seed=4)
    ckpt = _save_sharded(tmp_path, lm, optimizer, scheduler, last=True)
    assert (ckpt / "model" / "model.safetensors").is_file() and checkpoint.is_sharded(ckpt)


def _damaged_copy(sharded_ckpt, tmp_path):
    import shutil

    ckpt = tmp_path / "step-00000002"
    shutil.copytree(sharded_ckpt[0], ckpt)
    return ckpt, next((ckpt / "sharded").glob("__0_*.distcp"))


def test_a_truncated_shard_is_refused_naming_the_checkpoint_and_the_fix(sharded_ckpt, tmp_path):
    ckpt, shard = _damaged_copy(sharded_ckpt, tmp_path)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(FormatError, match=rf"{shard.name} has 100 bytes.*{ckpt} is damaged; delete it"):
        _resume(ckpt)


def test_a_missing_shard_is_refused(sharded_ckpt, tmp_path):
    ckpt, shard = _damaged_copy(sharded_ckpt, tmp_path)
    shard.unlink()
    with pytest.raises(FormatError, match=rf"{shard.name} is missing.*delete it to resume from the previous"):
        _resume(ckpt)


def test_a_shard_with_garbage_of_the_right_size_is_refused(sharded_ckpt, tmp_path):
    ckpt, shard = _damaged_copy(sharded_ckpt, tmp_path)
    shard.write_bytes(bytes(shard.stat().st_size))
    with pytest.raises(FormatError, match=rf"cannot read this sharded checkpoint \(UnpicklingError: .*delete {ckpt}"):
        _resume(ckpt)


def test_a_metadata_file_that_would_run_code_is_refused(sharded_ckpt, tmp_path):
    """DCP reads .metadata with pickle: a tampered one (its size recorded to match) must not run code."""
    import pickle

    ckpt, _ = _damaged_copy(sharded_ckpt, tmp_path)
    meta = ckpt / "sharded" / ".metadata"
    meta.write_bytes(pickle.dumps(_Payload()))
    state = checkpoint.load_trainer_state(ckpt)
    state["sharded_files"][".metadata"] = meta.stat().st_size
    torch.save(state, ckpt / "trainer.pt")
    with pytest.raises(FormatError, match="cannot read this sharded checkpoint.*refers to builtins.getattr"):
        _resume(ckpt)
    assert RAN == []


@pytest.mark.multiprocess
def test_fsdp_sharded_checkpoint_resumes_to_the_uninterrupted_run(tiny, tmp_path):
    """2 processes (gloo), FSDP2: checkpoints are sharded (DCP, checkpoint_format auto); resuming from the
    step-2 checkpoint gives the uninterrupted run's losses and final weights."""
    import shutil
    import subprocess

    from .kd_fixtures import PYTHON, REPO, final_weights, python_env, read_metrics, train_args

    def torchrun(out, *extra):
        cmd = [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "train_student",
            *train_args(tiny["student"], tiny["cache"], out, steps=4, save_every=2, epochs=0, eval_fraction=0),
            "--fsdp",
            *extra,
        ]
        done = subprocess.run(cmd, env=python_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    whole = tmp_path / "whole"
    torchrun(whole)
    step2 = whole / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in (step2 / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list((step2 / "model").glob("*.safetensors"))  # no rank gathered the full state
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed, ignore=shutil.ignore_patterns("step-00000004", "final"))
    assert "resumed from" in torchrun(resumed, "--resume")
    train = [[r for r in read_metrics(run) if r["split"] == "train"] for run in (whole, resumed)]
    assert [r["step"] for r in train[1]] == [1, 2, 3, 4]
    for a, b in zip(train[0], train[1]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    want, got = final_weights(whole), final_weights(resumed)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
