"""Checkpoints: HF weights + optimizer + scheduler + RNG + reader cursors + step, written atomically.

    RUN/checkpoints/step-00001000/
        model/          save_pretrained (+ tokenizer): transformers and vLLM load it directly
        trainer.pt      optimizer, scheduler, step/stage counters, config, and per rank: the data
                        cursor and RNG states; tensors and plain types only (lists, dicts, numbers,
                        strings), loaded with torch.load(weights_only=True), which runs no code

A checkpoint is written under a hidden temporary name and renamed into place when complete, so a
run killed at any moment leaves only whole checkpoints behind; `latest()` picks the newest.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from formats.errors import InputError

STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(run_dir)
    if not root.exists():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
    return steps[-1][1] if steps else None


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain types (a weights_only load accepts them)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"name": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                   "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["key"], np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def model_and_optimizer_state(lm, module, optimizer, *, fsdp: bool) -> tuple[dict | None, dict]:
    """Full (unsharded) state dicts; collective under FSDP (call on every rank)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(lm, options=opts)
        if getattr(lm.config, "tie_word_embeddings", False):  # save_pretrained would keep the tied copy
            head = lm.get_output_embeddings()
            model_sd.pop(next(f"{n}.weight" for n, m in lm.named_modules() if m is head), None)
        return model_sd, get_optimizer_state_dict(lm, optimizer, options=opts)
    return None, optimizer.state_dict()


def save(run_dir: str | Path, *, step: int, lm, module, optimizer, scheduler, tokenizer, rank_state: dict,
         trainer_state: dict, keep: int, fsdp: bool = False) -> Path | None:
    """Write checkpoint `step` (collective: call on every rank). Returns its folder on rank 0."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    model_sd, optim_sd = model_and_optimizer_state(lm, module, optimizer, fsdp=fsdp)
    ranks = _gather({"rng": rng_state(), **rank_state})
    final = checkpoint_dir(run_dir) / f"step-{step:08d}"
    if rank == 0:
        tmp = final.with_name(f".{final.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        lm.save_pretrained(tmp / "model", state_dict=model_sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        torch.save({"step": step, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                    "ranks": ranks, **trainer_state}, tmp / "trainer.pt")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(run_dir, keep)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return final if rank == 0 else None


def _prune(run_dir, keep: int) -> None:
    root = checkpoint_dir(run_dir)
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_trainer_state(ckpt: Path) -> dict:
    """trainer.pt, loaded with weights_only=True: a file holding any other object is refused (InputError)."""
    path = Path(ckpt) / "trainer.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"a {found.group(1)} object" if found else "objects other than tensors and plain types"
        raise InputError(f"{path}: holds {what}, refused (loading it could run code); resume only from "
                         "checkpoints this version of kdcache wrote") from None


def load_optimizer(lm, optimizer, state: dict, *, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(lm, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
