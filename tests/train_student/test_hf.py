"""train_student/hf.py: a kdcache cache in transformers' Trainer and TRL's SFTTrainer, with the real
libraries on tiny real models (no mocks): the dataset's items and split, the collator, the first-step
loss against kd_loss, weights and eval metrics against `kdcache train`, LoRA, bf16, resume,
TensorBoard logs, SFTTrainer, and refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from formats import CacheReader
from formats.errors import ChecksumError, FormatError, InputError
from train_student.__main__ import main as train_main
from train_student.data import ExampleStream, Packer, open_readers
from train_student.hf import KDCacheDataset, KDDataCollator, KDTrainer, RowGroupSampler
from train_student.loss import kd_loss

from .kd_fixtures import final_weights, make_model, make_tokenizer, read_metrics, save_model, train_args, write_cache

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def one_per_batch(tmp_path_factory):
    """A cache whose examples (21-40 tokens) never share a 40-token packed sequence, so `kdcache train
    --max-tokens 40` and a Trainer with batch size 1 see the same micro-batches."""
    root = tmp_path_factory.mktemp("hf")
    tok = make_tokenizer()
    teacher = make_model(seed=1, scale=0.12).eval()
    return {
        "tokenizer": tok,
        "student": save_model(make_model(seed=2), tok, root / "student"),
        "cache": write_cache(teacher, tok, root / "cache", n=30, min_len=21, max_len=40, row_group_positions=60),
        "root": root,
    }


def _args(out, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=1,
        per_device_eval_batch_size=4,
        max_steps=4,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _student(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


# ---- the dataset ---------------------------------------------------------------------------------
def test_items_are_the_cache_in_hf_layout(one_per_batch):
    ds = KDCacheDataset(one_per_batch["cache"], split="all", eval_fraction=0.2)
    reader = CacheReader(one_per_batch["cache"])
    examples = list(reader)
    assert len(ds) == len(examples) == 30
    for i in (0, 7, 29):
        ex, item = examples[i], ds[i]
        tp = ex.target_positions
        assert torch.equal(item["input_ids"], torch.from_numpy(ex.input_ids.astype(np.int64)))
        assert torch.equal(item["labels"], torch.from_numpy(ex.labels))
        assert item["teacher_ids"].dtype == torch.int32 and item["teacher_logprobs"].dtype == torch.float32
        assert item["teacher_ids"].shape == (len(ex.input_ids), 8)
        np.testing.assert_array_equal(item["teacher_ids"].numpy()[tp], ex.topk_ids)
        np.testing.assert_array_equal(item["teacher_logprobs"].numpy()[tp], ex.topk_logprobs)
        untrained = np.setdiff1d(np.arange(len(ex.input_ids)), tp)
        assert (item["teacher_ids"].numpy()[untrained] == -1).all()
        assert np.isneginf(item["teacher_logprobs"].numpy()[untrained]).all()
        assert (item["labels"].numpy()[untrained] == -100).all()
    assert torch.equal(ds[-1]["input_ids"], ds[29]["input_ids"])
    with pytest.raises(IndexError):
        ds[30]


def test_split_is_kdcache_trains(one_per_batch):
    cache = str(one_per_batch["cache"])
    for split in ("train", "eval"):
        ds = KDCacheDataset(cache, split=split, eval_fraction=0.3)
        readers = open_readers([cache], rank=0, world_size=1, shuffle=False, seed=0, epochs=1, max_examples=None)
        stream_ids = [ex.id for ex in ExampleStream(readers, split=split, eval_fraction=0.3)]
        assert [ds.example(i).id for i in range(len(ds))] == stream_ids
    train, held = (KDCacheDataset(cache, split=s, eval_fraction=0.3) for s in ("train", "eval"))
    assert len(train) + len(held) == 30 and len(held) > 0
    readers = open_readers([cache], rank=0, world_size=1, shuffle=False, seed=0, epochs=1, max_examples=None)
    half = [ex.id for ex in ExampleStream(readers, split="train", eval_fraction=0.3, fraction=0.5)]
    ds = KDCacheDataset(cache, split="train", eval_fraction=0.3, fraction=0.5)
    assert [ds.example(i).id for i in range(len(ds))] == half and 0 < len(half) < len(train)
    other = KDCacheDataset(cache, split="train", eval_fraction=0.3, fraction=0.5, seed=1)
    assert {other.example(i).id for i in range(len(other))} <= {train.example(i).id for i in range(len(train))}


def test_max_length_cuts_and_trains_nothing_past_it(one_per_batch):
    ds = KDCacheDataset(one_per_batch["cache"], split="all", max_length=24)
    item = ds[0]
    assert len(item["input_ids"]) == min(24, len(ds.example(0).input_ids))
    assert item["teacher_ids"].shape[0] == len(item["input_ids"])


def test_a_tampered_cache_is_refused_when_opened(one_per_batch, tmp_path):
    import shutil

    cache = shutil.copytree(one_per_batch["cache"], tmp_path / "cache")
    shard = sorted(cache.glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises((ChecksumError, FormatError), match=shard.name):
        KDCacheDataset(str(cache))


def test_a_missing_cache_and_a_bad_split_are_one_line(tmp_path):
    with pytest.raises((InputError, FormatError, FileNotFoundError)):
        KDCacheDataset(str(tmp_path / "nothing"))
    with pytest.raises(InputError, match="split='dev'"):
        KDCacheDataset(str(tmp_path), split="dev")


def test_a_student_with_another_tokenizer_is_refused(one_per_batch):
    other = make_tokenizer(extra="X")  # one token renamed: another fingerprint
    with pytest.raises(InputError, match="cross-tokenizer auto"):
        KDCacheDataset(one_per_batch["cache"], tokenizer=other)
    KDCacheDataset(one_per_batch["cache"], tokenizer=one_per_batch["tokenizer"])  # the teacher's: fine


def test_row_group_sampler_visits_each_example_once_group_by_group(one_per_batch):
    ds = KDCacheDataset(one_per_batch["cache"], split="all")
    groups = ds.row_groups()
    assert len(groups) > 3
    sampler = RowGroupSampler(ds, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(ds))) and order != list(range(len(ds)))
    group_of = {int(i): g for g, members in enumerate(groups) for i in members}
    runs = [group_of[i] for i in order]
    assert len([g for j, g in enumerate(runs) if j == 0 or g != runs[j - 1]]) == len(groups)  # contiguous
    sampler.set_epoch(1)
    assert list(sampler) != order


# ---- the collator --------------------------------------------------------------------------------
def test_pack_is_kdcache_trains_packing(one_per_batch):
    ds = KDCacheDataset(one_per_batch["cache"], split="all")
    batch = KDDataCollator(pack=True)([ds[0], ds[1], ds[2]])
    packed = Packer(iter([ds.example(i) for i in range(3)]), max_tokens=10_000, k=ds.k).__next__()
    assert torch.equal(batch["input_ids"], packed.input_ids)
    assert torch.equal(batch["position_ids"], packed.position_ids)
    # kdcache's batches are shifted (row t-1 carries token t's label); the collator's are HF's (unshifted)
    assert torch.equal(batch["labels"][0, 1:], packed.labels[:-1])
    assert torch.equal(batch["teacher_ids"][0, 1:].long(), packed.topk_ids[:-1])
    assert torch.equal(batch["teacher_logprobs"][0, 1:], packed.topk_logprobs[:-1])
    assert "attention_mask" not in batch


def test_pad_fills_as_kd_loss_expects():
    def item(n, k):
        return {
            "input_ids": torch.arange(n),
            "labels": torch.arange(n),
            "teacher_ids": torch.zeros(n, k, dtype=torch.int32),
            "teacher_logprobs": torch.zeros(n, k),
        }

    batch = KDDataCollator(pad_token_id=7, pad_to_multiple_of=8)([item(3, 2), item(5, 4)])
    assert batch["input_ids"].shape == (2, 8) and batch["teacher_ids"].shape == (2, 8, 4)
    assert batch["input_ids"][0, 3:].eq(7).all() and batch["attention_mask"][0].tolist() == [1] * 3 + [0] * 5
    assert batch["labels"][0, 3:].eq(-100).all()
    assert batch["teacher_ids"][0, :3, 2:].eq(-1).all() and batch["teacher_ids"][0, 3:].eq(-1).all()
    assert torch.isneginf(batch["teacher_logprobs"][0, :3, 2:]).all()
    with pytest.raises(ValueError, match="remove_unused_columns"):
        KDDataCollator()([{"input_ids": torch.arange(3), "labels": torch.arange(3)}])


# ---- the trainer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pack", [False, True])
def test_first_step_loss_is_kd_loss_on_the_batch(one_per_batch, tmp_path, pack):
    ds = KDCacheDataset(one_per_batch["cache"], split="train", eval_fraction=0.2)
    collator = KDDataCollator(pack=pack)
    student = _student(one_per_batch["student"])
    trainer = KDTrainer(
        model=student,
        args=_args(tmp_path, per_device_train_batch_size=3, max_steps=1, train_sampling_strategy="sequential"),
        train_dataset=ds,
        data_collator=collator,
        ce_weight=0.3,
        temperature=2.0,
        tail="bucket",
    )
    batch = collator([ds[0], ds[1], ds[2]])
    with torch.no_grad():
        hidden = student.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
        ).last_hidden_state
        k = batch["teacher_ids"].shape[-1]
        expected, _ = kd_loss(
            hidden[:, :-1].reshape(-1, hidden.shape[-1]),
            student.lm_head.weight,
            batch["teacher_ids"][:, 1:].reshape(-1, k),
            batch["teacher_logprobs"][:, 1:].reshape(-1, k),
            batch["labels"][:, 1:].reshape(-1),
            ce_weight=0.3,
            temperature=2.0,
            tail="bucket",
        )
    trainer.train()
    first = trainer.state.log_history[0]["loss"]
    assert first == pytest.approx(float(expected), rel=1e-6, abs=1e-6)


def test_weights_and_eval_equal_kdcache_train(one_per_batch, tmp_path):
    """Same data and order (no shuffle, one example per micro-batch), 2 micro-batches per step, AdamW at a
    constant lr with the same betas, no weight decay, clip 1.0: the same weights after 6 steps and the
    same held-out metrics."""
    cache, student = str(one_per_batch["cache"]), str(one_per_batch["student"])
    run = tmp_path / "kdcache"
    flags = dict(
        steps=6,
        grad_accum=2,
        max_tokens=40,
        shuffle=False,
        lr=3e-3,
        warmup_steps=0,
        min_lr_ratio=1.0,
        weight_decay=0.0,
        beta2=0.95,
        grad_clip=1.0,
        eval_fraction=0.2,
        eval_max_examples=1000,
        eval_every=0,
        ce_weight=0.25,
    )
    assert train_main(train_args(student, cache, run, **flags)) == 0
    trainer = KDTrainer(
        model=_student(student),
        args=_args(tmp_path / "hf", max_steps=6, gradient_accumulation_steps=2, train_sampling_strategy="sequential"),
        train_dataset=KDCacheDataset(cache, split="train", eval_fraction=0.2),
        eval_dataset=KDCacheDataset(cache, split="eval", eval_fraction=0.2),
        data_collator=KDDataCollator(pack=True),
        ce_weight=0.25,
    )
    trainer.train()
    ours = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    theirs = final_weights(run)
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
    assert worst < 1e-5, worst
    losses = [r["loss"] for r in read_metrics(run) if r["split"] == "train"]
    assert [r["loss"] for r in trainer.state.log_history if "loss" in r] == pytest.approx(losses, rel=1e-5)
    held = [r for r in read_metrics(run) if r["split"] == "eval"][-1]
    metrics = trainer.evaluate()
    for key in ("kl", "ce", "top1_agreement", "student_topk_mass"):
        assert metrics[f"eval_{key}"] == pytest.approx(held[key], rel=1e-5), key
    assert metrics["eval_targets"] == held["targets"]


def test_resume_from_a_trainer_checkpoint_continues_the_data(one_per_batch, tmp_path):
    cache, student = str(one_per_batch["cache"]), str(one_per_batch["student"])

    def trainer(out, steps=6):
        return KDTrainer(
            model=_student(student),
            args=_args(out, max_steps=steps, per_device_train_batch_size=2, save_strategy="steps", save_steps=3),
            train_dataset=KDCacheDataset(cache, split="train"),
            data_collator=KDDataCollator(),
        )

    straight = trainer(tmp_path / "a")
    straight.train()
    trainer(tmp_path / "b", steps=3).train()  # stops at the first checkpoint, as a killed job would
    resumed = trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_lora_adapter_trains_only_the_adapter(one_per_batch, tmp_path):
    peft = pytest.importorskip("peft")
    base = _student(one_per_batch["student"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = KDTrainer(
        model=model,
        args=_args(tmp_path, max_steps=3, per_device_train_batch_size=2),
        train_dataset=KDCacheDataset(one_per_batch["cache"]),
        data_collator=KDDataCollator(),
    )
    trainer.train()
    assert all(math.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)
    changed = [k for k, v in model.state_dict().items() if "lora_B" in k and v.abs().max() > 0]
    assert changed  # lora_B starts at 0
    merged = model.merge_and_unload().state_dict()
    assert torch.equal(merged["lm_head.weight"], before["lm_head.weight"])
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_lora_on_the_output_head_is_refused(one_per_batch, tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _student(one_per_batch["student"]), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    )
    with pytest.raises(InputError, match="lm_head"):
        KDTrainer(model=model, args=_args(tmp_path), train_dataset=KDCacheDataset(one_per_batch["cache"]))


@pytest.fixture
def fresh_accelerator():
    """accelerate keeps one process-wide state: a Trainer with another mixed precision needs it reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_and_tensorboard_logging(one_per_batch, tmp_path, fresh_accelerator):
    pytest.importorskip("tensorboard")
    trainer = KDTrainer(
        model=_student(one_per_batch["student"]),
        args=_args(tmp_path, max_steps=2, bf16=True, report_to=["tensorboard"]),
        train_dataset=KDCacheDataset(one_per_batch["cache"]),
        data_collator=KDDataCollator(),
    )
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) and 0 <= r["top1_agreement"] <= 1 for r in logs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/kd", "train/ce", "train/loss"} <= set(events.Tags()["scalars"])


def test_the_trainers_checks_and_errors(one_per_batch, tmp_path):
    ds = KDCacheDataset(one_per_batch["cache"])
    with pytest.raises(InputError, match="kind="):
        KDTrainer(model=_student(one_per_batch["student"]), args=_args(tmp_path), train_dataset=ds, kind="jsd")
    trainer = KDTrainer(model=_student(one_per_batch["student"]), args=_args(tmp_path), train_dataset=ds)
    with pytest.raises(ValueError, match="teacher_ids"):
        trainer.compute_loss(trainer.model, {"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": None})
    assert ds.output_size == 256  # the student's sizes: each item is checked against them


def test_trl_sft_trainer_takes_the_same_loss(one_per_batch, tmp_path):
    trl = pytest.importorskip("trl")
    from train_student.hf import KDSFTTrainer

    ds = KDCacheDataset(one_per_batch["cache"])
    as_datasets = ds.to_datasets(cache_dir=str(tmp_path / "datasets"))
    assert len(as_datasets) == len(ds) and as_datasets[3]["teacher_ids"] == ds[3]["teacher_ids"].tolist()
    losses = []
    for cls, args, data in (
        (KDTrainer, _args(tmp_path / "hf", max_steps=2, train_sampling_strategy="sequential"), ds),
        (
            KDSFTTrainer,
            trl.SFTConfig(
                **{k: v for k, v in _args(tmp_path / "trl").to_dict().items() if k in _TRL_KEYS},
                max_steps=2,
                train_sampling_strategy="sequential",
                dataset_kwargs={"skip_prepare_dataset": True},
                bf16=False,  # SFTConfig's default is bf16 where the CPU has it; KDTrainer's run is float32
            ),
            as_datasets,
        ),
    ):
        trainer = cls(
            model=_student(one_per_batch["student"]),
            args=args,
            train_dataset=data,
            data_collator=KDDataCollator(),
            processing_class=one_per_batch["tokenizer"],
            ce_weight=0.5,
        )
        trainer.train()
        losses.append([r["loss"] for r in trainer.state.log_history if "loss" in r])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


_TRL_KEYS = (
    "output_dir",
    "per_device_train_batch_size",
    "learning_rate",
    "lr_scheduler_type",
    "weight_decay",
    "adam_beta2",
    "max_grad_norm",
    "logging_steps",
    "report_to",
    "save_strategy",
    "use_cpu",
    "seed",
)


def test_metrics_file_is_json(one_per_batch, tmp_path):
    """The Trainer's own state file carries the KD metrics (what report_to backends receive)."""
    trainer = KDTrainer(
        model=_student(one_per_batch["student"]),
        args=_args(tmp_path, max_steps=1),
        train_dataset=KDCacheDataset(one_per_batch["cache"]),
        data_collator=KDDataCollator(),
    )
    trainer.train()
    trainer.save_state()
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert {"kd", "ce", "top1_agreement"} <= set(state["log_history"][0])


_DDP_SCRIPT = """
import os, sys, torch, transformers
from train_student.hf import KDCacheDataset, KDDataCollator, KDTrainer
cache, student, out, accum = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
args = transformers.TrainingArguments(
    output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=accum, max_steps=3,
    learning_rate=3e-3, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
    report_to=[], save_strategy="no", use_cpu=True, seed=0, train_sampling_strategy="sequential",
    dataloader_num_workers=0, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
)
model = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
trainer = KDTrainer(model=model, args=args, train_dataset=KDCacheDataset(cache, eval_fraction=0.2),
                    data_collator=KDDataCollator(pack=True), ce_weight=0.25)
trainer.train()
if trainer.is_world_process_zero():
    trainer.save_model(out + "/final")
"""


@pytest.mark.multiprocess
def test_ddp_two_processes_equal_one_process_with_accumulation(one_per_batch, tmp_path):
    """torchrun, 2 processes x 1 micro-batch == 1 process x 2 micro-batches: the same examples per step
    (sequential order: rank r takes every other batch), the loss normalized over the step's trained
    positions on both, so the same weights."""
    import subprocess
    import sys

    from .kd_fixtures import REPO, python_env

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    cache, student = str(one_per_batch["cache"]), str(one_per_batch["student"])
    runs = {
        "one": [sys.executable, str(script), cache, student, str(tmp_path / "one"), "2"],
        "two": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            cache,
            student,
            str(tmp_path / "two"),
            "1",
        ],
    }
    for name, cmd in runs.items():
        res = subprocess.run(cmd, env=python_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
        assert res.returncode == 0, res.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in runs)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
