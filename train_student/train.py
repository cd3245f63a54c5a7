"""Train a student from teacher top-k caches: setup, then one readable loop.

One process (CPU or one GPU):
    kdcache train --student runs/student --cache caches/tulu --steps 1000 --out runs/kd
A layer-pruned copy of the teacher as the student, KD + CE:
    kdcache train --init-from-teacher runs/teacher --keep-layers 0,5,10,15,20,29 \
        --cache caches/tulu --steps 1000 --kd-weight 1 --ce-weight 0.5 --out runs/kd
SFT baseline on the same tokens:     ... --kd-weight 0 --ce-weight 1
Multi-stage / YAML:                   kdcache train --config configs/train/two_stage.yaml
DDP on N GPUs (or CPU processes):     torchrun --nproc-per-node N -m train_student train ...
FSDP2 (students that don't fit):      torchrun --nproc-per-node N -m train_student train --fsdp ...
On GPUs:                              ... --dtype bf16-mixed --impl fused [--attn-implementation flash_attention_2]
Resume after preemption:              the same command with --resume

Batching: each rank packs examples into one sequence of <= max_tokens tokens per micro-batch;
a step is grad_accum micro-batches per rank. The loss is the mean over all trained tokens of the
global step (each micro-batch's token-mean loss is weighted by its share of the step's tokens),
so the update does not depend on how the tokens are split over ranks and micro-batches. A stage
that runs out of data ends when every rank has: a rank with fewer packed sequences left joins the
others' steps with empty micro-batches, and the last, partial step is trained too.

Refused before training: a student whose output head has extras the loss ignores (softcapping,
logit scales, an output bias), caches whose tokenizer does not match the student (unless
--cross-tokenizer allows it), and a stage that mixes teachers (unless allow_mixed_teachers).

A student with another tokenizer than the cache's teacher (`--cross-tokenizer`, auto by default;
docs/CROSS_TOKENIZER.md): before training, the teacher's tokenizer is loaded from the cache, the
student's template resolved and checked (`--student-template`), the vocabulary map built or loaded
(OUT/vocab_maps/); the examples are aligned in the reader's prefetch (`data.AlignedStream`), the loss
is `loss_xtok.xtok_loss`, and metrics.jsonl gains aligned_fraction and the exact / ULD / no-teacher
shares. OUT/cross_tokenizer.json records the method, the template and the map's coverage per stage.

Refused during training: an example whose target spans or ids the student would misread
(`checks.check_example_fits_student`, `checks.check_ids_fit_student` once aligned).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from formats.errors import InputError
from formats.common.hardware import native_bf16
from formats.tokenizer_files import load_cache_tokenizer
from formats.safe_write import write_json_atomic
from formats.trust import load_json_file
from formats.tokenizer_id import (
    fingerprint_matches,
    load_tokenizer,
    manifest_fingerprint,
    tokenizer_fingerprint,
    vocab_size,
)
from train_student import checkpoint
from train_student.loss import eval_row, eval_sums
from train_student.model_card import cache_record, write_model_card
from train_student.config import Stage, TrainConfig
from train_student.checks import check_cache_fits_student, check_same_teacher, check_signal
from train_student.loss_options import LossSpec
from train_student.data import (
    IGNORE_INDEX,
    AlignedStream,
    ExampleStream,
    Packer,
    PackedBatch,
    cache_k,
    eval_batches,
    open_readers,
)
from train_student.xtok.check import check_student_tokenizer
from train_student.model import StudentLoss, check_output_head, load_student, prepare_student, prune_layers

log = logging.getLogger("train_student")


def check_bf16_updates(matrices: list[torch.Tensor], lr: float) -> None:
    """Pure bf16 keeps bf16 weights and no fp32 master copy: an AdamW update (about lr per weight) smaller
    than half a weight's bf16 spacing rounds away. Refuse a run where that holds for most matrix weights."""
    lost = total = 0
    for p in matrices:
        w = p.detach().float().abs()
        spacing = torch.exp2(torch.floor(torch.log2(w.clamp_min(1e-30))) - 7)  # bf16: 8 significant bits
        lost += int((lr < spacing / 2).sum())
        total += w.numel()
    if total and lost / total > 0.5:
        raise InputError(
            f"--dtype bfloat16 keeps bf16 weights with no fp32 master copy: at --lr {lr:g}, an update "
            f"is below the bf16 rounding of {100 * lost / total:.0f}% of the matrix weights, so they would "
            "not train; use --dtype bf16-mixed (fp32 weights, bf16 compute)"
        )


def lr_lambda(step: int, *, warmup: int, total: int | None, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to min_ratio at `total` (constant 1 when total is unknown).

    Written here rather than taken from a library, which would change the rates: transformers'
    get_cosine_with_min_lr_schedule_with_warmup warms up from 0 (step 0 trains at lr 0, not lr/warmup)
    and needs a known total; torch's LinearLR + CosineAnnealingLR in a SequentialLR compute the cosine
    recursively (rates off by an ulp at most steps) and store another scheduler state in checkpoints."""
    if step < warmup:
        return (step + 1) / warmup
    if total is None or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Sums:
    """Named running sums (float64), all-reduced as one tensor in the fixed order of `keys`.

    Values may be Python numbers or 0-dim tensors on the training device: tensors are summed where they
    are, without reading them, so a step adds its metrics with no host sync; `reduced` reads them all
    at once (one sync per logging window)."""

    def __init__(self, *keys: str):
        self.keys = keys
        self.zero()

    def add(self, **values) -> None:
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                self.tensors[key] = value.detach().double() + self.tensors.get(key, 0.0)
            else:
                self.values[key] += float(value)

    def zero(self) -> None:
        self.values = dict.fromkeys(self.keys, 0.0)
        self.tensors: dict[str, torch.Tensor] = {}

    def reduced(self, all_reduce, extra: torch.Tensor | None = None) -> dict[str, float]:
        """The sums over every rank: `all_reduce` takes and returns a tensor (Trainer._all_reduce).
        `extra`: one more device value read in the same transfer (returned as "extra"; it is summed over
        ranks too, so give it divided by the world size when every rank holds the same value)."""
        host = torch.tensor([self.values[k] for k in self.keys], dtype=torch.float64)
        if self.tensors or extra is not None:
            device = next(iter(self.tensors.values())).device if self.tensors else extra.device
            t = host.to(device)
            parts = [t + torch.stack([self.tensors.get(k, t.new_zeros(())) for k in self.keys])]
            if extra is not None:
                parts.append(extra.detach().double().reshape(1).to(device))
            host = torch.cat(parts)
        values = all_reduce(host).tolist()
        out = dict(zip(self.keys, values))
        if extra is not None:
            out["extra"] = values[-1]
        return out


def _top1(sums: dict[str, float]) -> float:
    """Top-1 agreement over every scored position of the window (exact counts, not a mean of ratios)."""
    return sums["n_top1_agree"] / max(sums["n_scored"], 1.0)


CUT_COUNTS = ("truncated_examples", "dropped_positions", "skipped_examples")  # what --max-tokens cost, per window
XTOK_COUNTS = ("n_aligned", "n_exact", "n_uld")  # xtok_loss's per-batch row counts, summed over a window


def _xtok_shares(sums: dict[str, float]) -> dict[str, float]:
    """Shares of the trained positions: aligned (a teacher row paired), exact-map, ULD, no teacher (CE only)."""
    tok = max(sums["targets"], 1.0)
    aligned = sums["n_aligned"] / tok
    return {
        "aligned_fraction": aligned,
        "exact_share": sums["n_exact"] / tok,
        "uld_share": sums["n_uld"] / tok,
        "no_teacher_share": 1.0 - aligned,
    }


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.stages: list[Stage] = cfg.resolved_stages()
        self.out = Path(cfg.out)
        self.step = 0  # optimizer steps over the whole run
        self.stage_idx = 0
        self.stage_step = 0  # optimizer steps in the current stage
        self.data_state = None  # per-rank packer cursor to resume from
        self._stop_signal = False
        self._last_eval = -1  # step of the latest evaluation
        self._old_sigterm = None
        self.tb = None
        self.xtok: list[dict | None] = []  # per stage: None (same tokenizer) or its cross-tokenizer setup
        self.cache_records: list[list[dict]] = []  # per stage, rank 0: what final/README.md says of its caches

    # ==== setup ===================================================================================
    def setup(self) -> None:
        self._setup_distributed()
        ckpt = self._find_checkpoint()
        self._setup_model(ckpt)
        self._check_caches()
        self._setup_optimizer()
        if ckpt is not None:
            self._load_checkpoint(ckpt)
        self._setup_logging()
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _setup_distributed(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed = self.world > 1
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = self.cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda":
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device(device)
        if self.cfg.impl == "fused" and self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise InputError(
                f"--impl fused is the Triton GPU kernel and this run is on {self.device} "
                f"(CUDA available: {torch.cuda.is_available()}); use --impl chunked (the same loss in "
                "PyTorch, the CPU default)"
            )
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.cfg.fsdp and not self.distributed:
            log.warning("--fsdp without torchrun (one process): training unsharded")
        torch.manual_seed(self.cfg.seed)
        self.main = self.rank == 0

    def _find_checkpoint(self) -> Path | None:
        ckpt = checkpoint.latest(self.out)
        if ckpt is not None and not self.cfg.resume:
            raise InputError(
                f"{self.out} already holds checkpoints (newest {ckpt.name}); "
                "pass --resume to continue that run, or choose another --out"
            )
        if ckpt is None and self.cfg.resume:
            log.info("--resume: no checkpoint in %s, starting from scratch", self.out)
        return ckpt

    def _setup_model(self, ckpt: Path | None) -> None:
        cfg = self.cfg
        if cfg.dtype == "auto":  # resolved here, for the device this rank trains on; config.json records it
            native, why = native_bf16(str(self.device))
            cfg.dtype = "bf16-mixed" if native else "float32"
            log.info("dtype auto -> %s (%s)", cfg.dtype, why)
        source = cfg.student
        if cfg.init_from_teacher:
            source = str(self.out / "student-init")
            if self.main and not (Path(source) / "config.json").exists():
                prune_layers(cfg.init_from_teacher, cfg.keep_layers, source)
            self._barrier()
        self.tokenizer = load_tokenizer(cfg.tokenizer or source)
        lm = load_student(
            checkpoint.student_weights(ckpt, source), dtype=cfg.dtype, attn_implementation=cfg.attn_implementation
        )
        check_output_head(lm, source)
        # what the cached ids must index: checked per example before any batch reaches the loss kernel
        self.input_size = lm.get_input_embeddings().weight.shape[0]
        self.output_size = lm.get_output_embeddings().weight.shape[0]
        self.lm = prepare_student(lm, gradient_checkpointing=cfg.gradient_checkpointing).to(self.device)
        if cfg.compile:
            self.lm.get_decoder().compile()
        mixed = cfg.dtype == "bf16-mixed"
        self.fsdp = cfg.fsdp and self.distributed
        module = StudentLoss(self.lm, autocast=torch.bfloat16 if mixed and not self.fsdp else None)
        if self.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            # bf16-mixed under FSDP2: bf16 parameters in forward/backward, fp32 gradient reduction
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else None
            kwargs = {"mp_policy": mp} if mp else {}
            for layer in self.lm.get_decoder().layers:
                fully_shard(layer, **kwargs)
            fully_shard(module, **kwargs)
        elif self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None, broadcast_buffers=False
            )
        self.module = module
        n_params = sum(p.numel() for p in self.lm.parameters())
        log.info(
            "student: %s (%.1fM parameters, %s, %d layers)",
            source,
            n_params / 1e6,
            cfg.dtype,
            self.lm.config.num_hidden_layers,
        )

    def _check_caches(self) -> None:
        vocab = vocab_size(self.tokenizer)
        self.xtok, self.cache_records = [], []
        for stage in self.stages:
            manifests, methods = [], []
            for path in stage.cache:
                readers = open_readers([path], rank=0, world_size=1, shuffle=False, seed=0, epochs=1, max_examples=64)
                method = check_student_tokenizer(readers[0].manifest, self.tokenizer, self.cfg.cross_tokenizer, path)
                fingerprint = manifest_fingerprint(self.tokenizer, readers[0].manifest.get("tokenizer"))  # v1 or v2
                check_cache_fits_student(
                    readers[0].manifest,
                    path,
                    fingerprint=fingerprint,
                    tokenizer_vocab=vocab,
                    output_size=self.output_size,
                    cross_tokenizer=method != "off",
                )
                if self.main:
                    check_signal(readers[0], path)
                manifests.append(readers[0].manifest)
                methods.append(method)
            check_same_teacher(manifests, stage.cache, stage.name, allow_mixed=self.cfg.allow_mixed_teachers)
            self.cache_records.append([cache_record(p, m) for p, m in zip(stage.cache, manifests)] if self.main else [])
            if len(set(methods)) > 1:
                raise InputError(
                    f"stage {stage.name}: its caches need different paths for this student "
                    f"({', '.join(f'{p}: {m}' for p, m in zip(stage.cache, methods))}; off = the "
                    "student's own tokenizer); put them in separate stages"
                )
            self.xtok.append(None if methods[0] == "off" else self._setup_cross_tokenizer(stage, methods[0], manifests))

    def _setup_cross_tokenizer(self, stage: Stage, method: str, manifests: list[dict]) -> dict:
        """Before training: the teacher's tokenizer (from the cache), the student's template (resolved and
        checked, BOS rule included), the vocabulary map (OUT/vocab_maps/, built once per tokenizer pair),
        the Aligner. Returns the stage's setup; its "record" goes to OUT/cross_tokenizer.json."""
        from train_student.xtok.align import Aligner
        from train_student.xtok.template import check_student_rendering, resolve_student_template
        from train_student.xtok.vocab_map import load_or_build_vocab_map, vocab_map_path

        teacher_tokenizer = load_cache_tokenizer(stage.cache[0])  # checked against its manifest's fingerprint
        if not all(fingerprint_matches(teacher_tokenizer, m.get("tokenizer")) for m in manifests[1:]):
            raise InputError(
                f"stage {stage.name}: its caches come from teachers with different tokenizers; a "
                "student with another tokenizer aligns to one teacher tokenizer per stage: put them "
                "in separate stages"
            )
        template = resolve_student_template(self.cfg.student_template, self.tokenizer)
        template_record = check_student_rendering(self.tokenizer, template, self.lm.config)
        maps = self.out / "vocab_maps"
        vmap = load_or_build_vocab_map(teacher_tokenizer, self.tokenizer, maps)
        fingerprint = tokenizer_fingerprint(self.tokenizer)
        map_path = vocab_map_path(maps, tokenizer_fingerprint(teacher_tokenizer), fingerprint)
        coverage = float((vmap >= 0).mean()) if len(vmap) else 0.0
        record = {
            "method": method,
            "cross_tokenizer": self.cfg.cross_tokenizer,
            "teacher_tokenizer": (manifests[0].get("tokenizer") or {}).get("name_or_path"),
            "student_tokenizer_fingerprint": fingerprint,
            "student_template": template_record,
            "vocab_map": {"path": str(map_path), "coverage": coverage},
        }
        log.info(
            "%s: cross-tokenizer %s to the teacher's tokenizer (%s); student template %s (BOS %s); "
            "vocabulary map %s: %.1f%% of the teacher's ids have a student twin",
            stage.name,
            method,
            record["teacher_tokenizer"],
            template.source,
            template_record["bos"],
            map_path,
            100 * coverage,
        )
        if self.cfg.impl == "fused" and method != "exact-map" and not any(self.xtok):  # said once per run
            log.info(
                "--impl fused: the exact-map rows use the fused kernel; the ULD rows (no shared vocabulary) "
                "are computed in PyTorch, chunked"
            )
        aligner = Aligner(teacher_tokenizer, self.tokenizer, template, bos_id=template_record["bos_token_id"])
        return {"method": method, "aligner": aligner, "vmap": vmap, "record": record}

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        params = [p for p in self.module.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
        )
        steps = [s.steps for s in self.stages]
        self.total_steps = None if None in steps else sum(steps)
        if self.total_steps is not None and cfg.warmup_steps >= self.total_steps:
            log.warning(
                "--warmup-steps %d >= the run's %d steps: the learning rate never reaches --lr %g (it ends "
                "at %.3g); lower --warmup-steps",
                cfg.warmup_steps,
                self.total_steps,
                cfg.lr,
                cfg.lr * self.total_steps / max(cfg.warmup_steps, 1),
            )
        if cfg.dtype == "bfloat16":
            check_bf16_updates(decay, cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_lambda(s, warmup=cfg.warmup_steps, total=self.total_steps, min_ratio=cfg.min_lr_ratio),
        )

    def _load_checkpoint(self, ckpt: Path) -> None:
        state = checkpoint.load_trainer_state(ckpt)
        if state["world_size"] != self.world:
            raise InputError(
                f"{ckpt} was written by {state['world_size']} processes, this run has {self.world}; "
                "resume with the same number of processes (the data cursor is per rank)"
            )
        checkpoint.load_model_and_optimizer(ckpt, state, self.lm, self.optimizer, fsdp=self.fsdp)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.stage_idx, self.stage_step = state["step"], state["stage_idx"], state["stage_step"]
        mine = state["ranks"][self.rank]
        self.data_state = mine["data"]
        checkpoint.set_rng_state(mine["rng"])
        if self.main:
            self._truncate_metrics(self.step)
        log.info("resumed from %s (step %d, stage %d)", ckpt, self.step, self.stage_idx)

    def _setup_logging(self) -> None:
        self.tb = None
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if self.step == 0 and (self.out / "metrics.jsonl").exists():  # a fresh run: no stale lines
            (self.out / "metrics.jsonl").unlink()
        (self.out / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        records = {stage.name: x["record"] for stage, x in zip(self.stages, self.xtok) if x is not None}
        if records:  # a student with another tokenizer: how each stage aligned it
            (self.out / "cross_tokenizer.json").write_text(json.dumps(records, indent=2) + "\n")
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step or None)
            except ImportError:
                log.info("tensorboard is not installed: metrics go to metrics.jsonl only")

    # ==== the loop ================================================================================
    def train(self) -> int:
        """Run every stage from the current position. Returns 0 (done) or 0 after a SIGTERM save."""
        if self.stage_idx >= len(self.stages):
            if not (self.out / "final").exists():  # killed after the last checkpoint, before final/
                self._write_final()
            log.info("%s: the run is already complete (step %d); nothing to do", self.out, self.step)
            return 0
        for self.stage_idx in range(self.stage_idx, len(self.stages)):
            stage = self.stages[self.stage_idx]
            packer = self._packer(stage)
            if self.data_state is not None:
                packer.load_state_dict(self.data_state)
                self.data_state = None
            xtok = self.xtok[self.stage_idx]
            self.loss_spec = LossSpec.for_stage(stage, self.cfg, xtok["method"] if xtok else "off")
            self.eval_spec = self.loss_spec.for_evaluation()
            self.eval_set = eval_batches(
                stage.cache,
                rank=self.rank,
                world_size=self.world,
                eval_fraction=self.cfg.eval_fraction,
                max_tokens=self.cfg.max_tokens,
                max_examples=self.cfg.eval_max_examples,
                input_size=self.input_size,
                output_size=self.output_size,
                align=_align_fn(xtok),
                verify=self.cfg.verify,
                long_examples=self.cfg.long_examples,
            )
            self._note_eval_split(stage)
            if self.stage_step == 0:
                self.evaluate()
            stopped = self._train_stage(stage, packer)
            if stopped:
                return 0
            self.stage_step = 0
        self.stage_idx = len(self.stages)
        if self.step == 0:  # never an untrained final/ that looks like a result
            raise InputError(
                f"no optimizer step was taken: the stages' caches yielded no trainable example "
                f"(after the held-out split, --fraction, --max-tokens); nothing written to {self.out}/final"
            )
        if self._last_eval != self.step:
            self.evaluate()
        self.save(packer=None, last=True)
        self._write_final()
        return 0

    def _write_final(self) -> None:
        """final/: the last checkpoint's weights, where a user looks for them (copied whole, then renamed)."""
        if not self.main:
            return
        final, tmp = self.out / "final", self.out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint.latest(self.out) / "model", tmp)
        methods = [x["method"] if x else "off" for x in self.xtok]
        write_model_card(
            tmp,
            cfg=self.cfg,
            stages=self.stages,
            methods=methods,
            caches=self.cache_records,
            step=self.step,
            world=self.world,
            run_dir=self.out,
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        log.info("done: %d steps; student in %s", self.step, final)

    def _train_stage(self, stage: Stage, packer: Packer) -> bool:
        """Optimizer steps until the stage's step count or its data ends. True if stopped by SIGTERM."""
        cfg = self.cfg
        bar = self._progress(stage)
        # loss, kd, ce weighted by each micro-batch's targets; top-1 as exact counts
        window = Sums("loss", "kd", "ce", "n_top1_agree", "n_scored", "tokens", "targets", *XTOK_COUNTS, *CUT_COUNTS)
        cut = Sums(*CUT_COUNTS)  # the whole stage's, for its closing line
        xtok = self.xtok[self.stage_idx] is not None
        wait_s, step_s, t_last = 0.0, 0.0, time.perf_counter()
        while stage.steps is None or self.stage_step < stage.steps:
            # -- data: up to grad_accum packed sequences per rank; the stage ends when every rank has run
            # out. Ranks hold equal example counts but pack them into different numbers of sequences: one
            # out of data joins the step with empty micro-batches (no tokens, no gradient), so no rank's
            # last sequences and no last partial step are dropped --
            t0 = time.perf_counter()
            micro = [b for _, b in zip(range(cfg.grad_accum), packer)]
            wait_s += time.perf_counter() - t0
            n_targets = sum(b.n_targets for b in micro)
            counts = [float(len(micro)), float(n_targets)]
            if self.distributed:  # every rank's (one small all-reduce per step)
                counts = self._all_reduce(torch.tensor(counts)).tolist()
            if counts[0] == 0:
                log.info("%s: data exhausted after %d steps", stage.name, self.stage_step)
                break
            micro += [_dummy_batch() for _ in range(cfg.grad_accum - len(micro))]
            global_targets = max(counts[1], 1.0)

            # -- forward/backward: each micro-batch weighted by its share of the step's tokens --
            self.module.train()
            for i, batch in enumerate(micro):
                t = batch.n_targets  # counted on the host batch: no device read
                batch = batch.to(self.device)
                sync = i == len(micro) - 1
                with self._no_sync(not sync):
                    loss, metrics = self.module(
                        batch.input_ids,
                        batch.position_ids,
                        batch.topk_ids,
                        batch.topk_logprobs,
                        batch.labels,
                        spec=self.loss_spec,
                    )
                    share = t / global_targets
                    (loss * share * self.world).backward()
                if not batch.n_examples:  # an empty micro-batch of a rank out of data
                    continue
                counts = dict(
                    truncated_examples=batch.truncated, dropped_positions=batch.dropped, skipped_examples=batch.skipped
                )
                window.add(**counts)
                cut.add(**counts)
                window.add(  # device tensors, summed where they are: read once per logging window
                    loss=loss.detach().double() * t,
                    kd=metrics["kd"].double() * t,
                    ce=metrics["ce"].double() * t,
                    n_top1_agree=metrics["n_top1_agree"],
                    n_scored=metrics["n_scored"],
                    tokens=batch.n_tokens,
                    targets=t,
                )
                if xtok:
                    window.add(**{key: metrics[key] for key in XTOK_COUNTS})
            grad_norm = self._clip()  # a device tensor
            lr = self.scheduler.get_last_lr()[0]  # the rate of this update
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.stage_step += 1
            now = time.perf_counter()
            step_s, t_last = step_s + now - t_last, now

            # -- logging, evaluation, checkpoints, preemption --
            if self.step % cfg.log_every == 0:  # the one host read of the window (and of the grad norm)
                w = window.reduced(self._all_reduce, extra=grad_norm / self.world)
                grad_norm = w.pop("extra")
                tok = max(w["targets"], 1.0)
                row = {
                    "loss": w["loss"] / tok,
                    "kd": w["kd"] / tok,
                    "ce": w["ce"] / tok,
                    "top1_agreement": _top1(w),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": w["tokens"] / max(step_s, 1e-9),
                    "data_wait_frac": wait_s / max(step_s, 1e-9),
                    "tokens": int(w["tokens"]),
                }
                if xtok:
                    row.update(_xtok_shares(w))
                row.update({key: int(w[key]) for key in CUT_COUNTS})
                self._log("train", row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                window.zero()
                wait_s = step_s = 0.0
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self.evaluate()
            stop = self._stop_signal
            if self.distributed:  # any rank's SIGTERM stops all of them at the same step
                stop = self._all_reduce(torch.tensor([float(stop)]))[0].item() > 0
            if stop or (cfg.save_every and self.step % cfg.save_every == 0):
                self.save(packer)
            if stop:
                log.info("SIGTERM: saved a checkpoint at step %d; exiting", self.step)
                return True
            t_last = time.perf_counter()  # exclude eval/checkpoint time from tokens/s
        if bar is not None:
            bar.close()
        c = cut.reduced(self._all_reduce)
        if any(c.values()):
            log.warning(
                "%s: %d examples longer than --max-tokens %d were cut (%d trained positions dropped), %d "
                "skipped (--long-examples %s, or nothing to train within max-tokens); raise --max-tokens to "
                "train them whole",
                stage.name,
                c["truncated_examples"],
                cfg.max_tokens,
                c["dropped_positions"],
                c["skipped_examples"],
                cfg.long_examples,
            )
        return False

    # ==== evaluation ==============================================================================
    def _note_eval_split(self, stage: Stage) -> None:
        """Say at the stage's start when its held-out split is empty (no evaluation will happen), and record
        every stage's held-out size in OUT/held_out.json (kdcache report reads the evaluations it makes)."""
        n = int(self._all_reduce(torch.tensor([float(sum(b.n_examples for b in self.eval_set))]))[0].item())
        if n == 0 and self.cfg.eval_fraction > 0:
            log.warning(
                "%s: the held-out split is empty (--eval-fraction %g of these caches' example ids selects "
                "none): no evaluation happens; raise --eval-fraction, or evaluate with `kdcache eval`",
                stage.name,
                self.cfg.eval_fraction,
            )
        if self.main:
            path = self.out / "held_out.json"
            record = load_json_file(path, max_bytes=1 << 20) if path.exists() else {}
            record[stage.name] = {
                "examples": n,
                "eval_fraction": self.cfg.eval_fraction,
                "eval_max_examples": self.cfg.eval_max_examples,
            }
            write_json_atomic(path, record)

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """KL(teacher || student) on the teacher's top-k (tail as in the current stage's training,
        tau = 1), CE on the dataset's tokens, perplexity and top-1 agreement, on the held-out split."""
        n = int(self._all_reduce(torch.tensor([float(len(self.eval_set))]), op="max")[0].item())
        if n == 0:
            return None
        model = self.module.module if (self.distributed and not self.fsdp) else self.module
        model.eval()
        # kd, ce, topk_mass weighted by each batch's targets; top-1 as exact counts
        sums = Sums("kd", "ce", "topk_mass", "n_top1_agree", "n_scored", "targets", "uld", *XTOK_COUNTS)
        xtok = self.xtok[min(self.stage_idx, len(self.stages) - 1)] is not None
        for i in range(n):  # same number of forwards on every rank (FSDP needs it)
            batch = self.eval_set[i] if i < len(self.eval_set) else _dummy_batch()
            batch = batch.to(self.device)
            _, m = model(
                batch.input_ids,
                batch.position_ids,
                batch.topk_ids,
                batch.topk_logprobs,
                batch.labels,
                spec=self.eval_spec,
            )
            sums.add(**{key: value.item() for key, value in eval_sums(m, batch.n_targets).items()})
            if xtok and batch.n_examples:  # uld: a mean over ULD rows, summed back
                sums.add(uld=m["uld"].item() * m["n_uld"].item(), **{key: m[key].item() for key in XTOK_COUNTS})
        s = sums.reduced(self._all_reduce)
        row = eval_row(s)
        if xtok:  # kl: the exact-map rows' KL averaged over every trained position (0 on the others)
            row.update(_xtok_shares(s), uld=s["uld"] / max(s["n_uld"], 1.0))
        self._log("eval", row)
        self._last_eval = self.step
        return row

    # ==== checkpoints =============================================================================
    def save(self, packer: Packer | None, last: bool = False) -> None:
        """Checkpoint the current step (every rank calls it; a step saved already is written again).
        `last`: the run's final checkpoint, whose weights final/ copies (gathered even when sharded)."""
        trainer_state = {
            "stage_idx": self.stage_idx,
            "stage_step": self.stage_step,
            "world_size": self.world,
            "config": asdict(self.cfg),
        }
        rank_state = {"data": packer.state_dict() if packer is not None else None}
        path = checkpoint.save(
            self.out,
            step=self.step,
            lm=self.lm,
            module=self.module,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            tokenizer=self.tokenizer,
            rank_state=rank_state,
            trainer_state=trainer_state,
            keep=self.cfg.keep_checkpoints,
            fsdp=self.fsdp,
            sharded=checkpoint.use_sharded(self.cfg.checkpoint_format, self.fsdp),
            last=last,
        )
        if path is not None:
            log.info("checkpoint %s", path)

    # ==== helpers =================================================================================
    def _packer(self, stage: Stage) -> Packer:
        readers = open_readers(
            stage.cache,
            rank=self.rank,
            world_size=self.world,
            shuffle=self.cfg.shuffle,
            seed=self.cfg.seed + self.stage_idx,
            epochs=stage.epochs or None,
            max_examples=stage.max_examples,
            verify=self.cfg.verify,
        )
        sizes = dict(input_size=self.input_size, output_size=self.output_size)
        xtok = self.xtok[self.stage_idx]
        stream = ExampleStream(
            readers,
            split="train",
            eval_fraction=self.cfg.eval_fraction,
            fraction=stage.fraction,
            **({} if xtok else sizes),
        )  # cached ids are the teacher's: checked once aligned
        if xtok:
            stream = AlignedStream(stream, xtok["aligner"], xtok["vmap"], xtok["method"], **sizes)
        if not sum(r.num_examples() for r in readers):
            raise InputError(
                f"stage {stage.name}: its caches hold no examples for this process "
                f"({', '.join(map(str, stage.cache))}); nothing to train: check --cache"
            )
        return Packer(stream, max_tokens=self.cfg.max_tokens, k=cache_k(readers), long_examples=self.cfg.long_examples)

    def _no_sync(self, skip_sync: bool):
        if skip_sync and self.distributed and not self.fsdp:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def _clip(self) -> torch.Tensor:
        """Clip to --grad-clip; the global gradient norm before clipping, as a 0-dim tensor (not read)."""
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        else:
            grads = [p.grad.norm() for p in self.module.parameters() if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else torch.zeros(())
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if not self.distributed:
            return t
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        x = t.to(dev)
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return x.cpu()

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM received: checkpointing after this step")
        self._stop_signal = True

    def _progress(self, stage: Stage):
        if not (self.main and self.cfg.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=stage.steps, initial=self.stage_step, desc=stage.name, unit="step", dynamic_ncols=True)

    def _log(self, split: str, row: dict) -> None:
        if not self.main:
            return
        rec = {
            "step": self.step,
            "stage": self.stages[min(self.stage_idx, len(self.stages) - 1)].name,
            "split": split,
            **row,
        }
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{split}/{key}", value, self.step)
            self.tb.flush()
        if split == "eval":
            log.info("step %d eval: %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in row.items()))

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics a killed run logged after the checkpoint we resume from."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in keep))

    def cleanup(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
        if getattr(self, "distributed", False) and dist.is_initialized():
            dist.destroy_process_group()


def _align_fn(xtok: dict | None):
    """The held-out examples' alignment for `eval_batches` (None: a student with the teacher's tokenizer)."""
    if xtok is None:
        return None
    from train_student.xtok.align import student_example

    return lambda ex: student_example(ex, xtok["aligner"], xtok["vmap"], xtok["method"])


def _dummy_batch() -> PackedBatch:
    """Two untrained tokens: lets a rank out of data (training) or without held-out data (eval) join the
    others' forwards and backwards with no effect on the update."""
    z = torch.zeros(1, 2, dtype=torch.long)
    return PackedBatch(
        z,
        torch.arange(2)[None],
        torch.full((2,), IGNORE_INDEX),
        torch.full((2, 1), -1),
        torch.full((2, 1), -math.inf),
        0,
    )


def run(cfg: TrainConfig) -> int:
    """setup -> train -> cleanup (the `kdcache train` entry)."""
    main = os.environ.get("RANK", "0") == "0"  # other ranks log warnings only
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if cfg.push_to_hub:  # what can be checked offline, now: a long run must not fail at its end on a token
        from formats.hub import check_can_write

        check_can_write(cfg.push_to_hub, "--push-to-hub")
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        code = trainer.train()
    finally:
        trainer.cleanup()
    if cfg.push_to_hub and trainer.main and trainer.stage_idx >= len(trainer.stages):  # finished, not stopped
        from formats.hub import upload_folder_files

        url = upload_folder_files(trainer.out / "final", cfg.push_to_hub, log=log.info)
        log.info("final/ uploaded to %s (%s)", cfg.push_to_hub, url)
    return code
