"""Checkpoints: weights + optimizer + scheduler + RNG + reader cursors + step, written atomically.

Two formats (TrainConfig.checkpoint_format; auto: sharded under FSDP, else full):

    RUN/checkpoints/step-00001000/          full: rank 0 gathers and writes everything
        model/          save_pretrained (+ tokenizer): transformers and vLLM load it directly
        trainer.pt      optimizer, scheduler, step/stage counters, config, and per rank: the data
                        cursor and RNG states; tensors and plain types only (lists, dicts, numbers,
                        strings), loaded with torch.load(weights_only=True), which runs no code

    RUN/checkpoints/step-00001000/          sharded: no rank ever holds the full state
        sharded/        torch.distributed.checkpoint (DCP) of {"model", "optimizer"}: each rank writes
                        its own shards (__<rank>_0.distcp) and rank 0 the .metadata
        model/          config (+ tokenizer); HF weights only in the run's last checkpoint, gathered
                        once at the end so that final/ loads like any checkpoint
        trainer.pt      as above without the optimizer, plus the size of every file under sharded/

Resuming a sharded checkpoint loads the student's starting weights, shards it, then reads every
rank's part of the model and optimizer from sharded/. The sizes recorded in trainer.pt catch a
missing or truncated shard before DCP reads it, and DCP's pickled .metadata is read with an
unpickler that admits only DCP's own metadata classes (tensors are loaded weights_only by DCP).
Sharded checkpoints need a filesystem every rank sees (as torchrun across nodes does anyway).

A checkpoint is written under a hidden temporary name and renamed into place when complete, so a
run killed at any moment leaves only whole checkpoints behind; `latest()` picks the newest.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from formats.errors import FormatError, InputError

STEP_DIR = re.compile(r"^step-(\d{8})$")
SHARDED_DIR = "sharded"  # the DCP folder of a sharded checkpoint


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
    numpy_state = {
        "name": name,
        "key": key.tolist(),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
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
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def use_sharded(checkpoint_format: str, fsdp: bool) -> bool:
    """Whether checkpoints are sharded (DCP): asked for, or `auto` under FSDP."""
    return checkpoint_format == "sharded" or (checkpoint_format == "auto" and fsdp)


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / SHARDED_DIR).is_dir()


def full_model_state(lm, *, fsdp: bool) -> dict | None:
    """The full (unsharded) model state on CPU under FSDP (collective: call on every rank); None otherwise
    (save_pretrained reads the unsharded model itself)."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model_sd = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if getattr(lm.config, "tie_word_embeddings", False):  # save_pretrained would keep the tied copy
        head = lm.get_output_embeddings()
        model_sd.pop(next(f"{n}.weight" for n, m in lm.named_modules() if m is head), None)
    return model_sd


def full_optimizer_state(lm, optimizer, *, fsdp: bool) -> dict:
    """The full optimizer state (collective under FSDP)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(lm, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save(
    run_dir: str | Path,
    *,
    step: int,
    lm,
    module,
    optimizer,
    scheduler,
    tokenizer,
    rank_state: dict,
    trainer_state: dict,
    keep: int,
    fsdp: bool = False,
    sharded: bool = False,
    last: bool = True,
) -> Path | None:
    """Write checkpoint `step` (collective: call on every rank). Returns its folder on rank 0.

    sharded: each rank writes its part of model and optimizer (DCP); the model's HF weights are then
    gathered only when `last` (the run's final checkpoint, which final/ copies)."""
    rank = dist.get_rank() if _distributed() else 0
    final = checkpoint_dir(run_dir) / f"step-{step:08d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    if sharded:
        _save_sharded(tmp / SHARDED_DIR, lm, optimizer)
        optim_sd = None
    else:
        optim_sd = full_optimizer_state(lm, optimizer, fsdp=fsdp)
    weights = not sharded or last
    model_sd = full_model_state(lm, fsdp=fsdp) if weights else None
    ranks = _gather({"rng": rng_state(), **rank_state})
    if rank == 0:
        if weights:
            lm.save_pretrained(tmp / "model", state_dict=model_sd)
        else:
            lm.config.save_pretrained(tmp / "model")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        state = {"step": step, "scheduler": scheduler.state_dict(), "ranks": ranks, **trainer_state}
        if sharded:
            state["sharded_files"] = {f.name: f.stat().st_size for f in (tmp / SHARDED_DIR).iterdir()}
        else:
            state["optimizer"] = optim_sd
        torch.save(state, tmp / "trainer.pt")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(run_dir, keep)
    _barrier()
    return final if rank == 0 else None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _save_sharded(path: Path, lm, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(lm, optimizer)
    with _single_process_is_intended():
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path, no_dist=not _distributed())


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns that it assumes a single process when torch.distributed is not initialized: so do we."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


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
        raise InputError(
            f"{path}: holds {what}, refused (loading it could run code); resume only from "
            "checkpoints this version of kdcache wrote"
        ) from None


def load_model_and_optimizer(ckpt: Path, state: dict, lm, optimizer, *, fsdp: bool) -> None:
    """Restore the optimizer, and for a sharded checkpoint also the model (collective under FSDP).

    A full checkpoint's weights were already loaded with the student (`student_weights`)."""
    if is_sharded(ckpt):
        _load_sharded(Path(ckpt), state, lm, optimizer)
    elif fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(lm, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])


def student_weights(ckpt: Path | None, source: str) -> str:
    """Where the student loads from: a full checkpoint's model/; for a sharded one (whose weights come from
    its shards after sharding) and a fresh run, `source`."""
    return str(Path(ckpt) / "model") if ckpt is not None and not is_sharded(ckpt) else source


def _load_sharded(ckpt: Path, state: dict, lm, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = ckpt / SHARDED_DIR
    _check_sharded_files(path, state.get("sharded_files"))
    model_sd, optim_sd = get_state_dict(lm, optimizer)
    try:
        with _single_process_is_intended():
            dcp.load(
                {"model": model_sd, "optimizer": optim_sd},
                storage_reader=_MetadataSafeReader(path),
                no_dist=not _distributed(),
            )
    except (CheckpointException, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise FormatError(
            f"{path}: cannot read this sharded checkpoint ({_first_line(exc)}); it is damaged: "
            f"delete {ckpt} to resume from the previous checkpoint"
        ) from None
    set_state_dict(lm, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def _check_sharded_files(path: Path, recorded: dict | None) -> None:
    """Every file the checkpoint recorded is there with its size (a missing or truncated shard: FormatError)."""
    if not recorded:
        raise FormatError(
            f"{path.parent}/trainer.pt lists no sharded files; the checkpoint is incomplete: "
            f"delete {path.parent} to resume from the previous checkpoint"
        )
    for name, size in sorted(recorded.items()):
        f = path / name
        got = f.stat().st_size if f.is_file() else None
        if got != size:
            what = "is missing" if got is None else f"has {got} bytes, the checkpoint recorded {size}"
            raise FormatError(
                f"{f} {what}: the sharded checkpoint {path.parent} is damaged; delete it to "
                "resume from the previous checkpoint"
            )


def _first_line(exc: BaseException) -> str:
    """The failure in a line: for DCP's CheckpointException, the first rank's own exception."""
    failures = getattr(exc, "failures", None)
    if failures:
        exc = next(iter(failures.values()))[0]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].split('. ')[0][:300]}" if text else type(exc).__name__


class _SafeMetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata without running code: only DCP's metadata classes, torch dtypes and sizes."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module in self.MODULES and not name.startswith("__")) or (module, name) in self.NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"the .metadata refers to {module}.{name}, which DCP metadata never holds")


class _MetadataSafeReader(FileSystemReader):
    """DCP's FileSystemReader, reading .metadata with `_SafeMetadataUnpickler` instead of pickle.load."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = (
            Path(self.path) / f"__{kwargs['rank']}.metadata"
            if kwargs.get("rank") is not None
            else Path(self.path) / ".metadata"
        )
        with open(path, "rb") as f:
            metadata = _SafeMetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
