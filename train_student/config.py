"""Training settings: `TrainConfig` and its `Stage`s, each setting declared once with
`formats.common.settings.setting` (its help, choices, `--help` section); `kdcache train`'s flags and the YAML
loading are generated from them.

A run is a list of stages (`Stage`). A multi-stage run lists them under `stages:`; a single-stage
run may give the stage's settings at the top level (`cache`, `steps`, `kd_weight`, ... in the file
or as flags), which `make_config` turns into the run's one stage:

    student: runs/student-init
    stages:
      - {cache: [caches/generate], steps: 2000, kd_weight: 1.0, ce_weight: 0.0}
      - {cache: [caches/tulu], steps: 1000, kd_weight: 0.5, ce_weight: 0.5}

Precedence: dataclass defaults < YAML file < command-line flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from formats.errors import InputError
from formats.common.settings import check_choices, merge, setting
from train_student.loss_options import CROSS_TOKENIZER_MODES, IMPLS, KINDS, TAILS

LONG_EXAMPLES = ("truncate", "skip")  # what the packer does with an example longer than max_tokens

STUDENT_DTYPES = ("auto", "float32", "bfloat16", "bf16-mixed")
CHECKPOINT_FORMATS = ("auto", "full", "sharded")  # train_student/checkpoint.py
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
SINGLE_STAGE = (
    "stage (single-stage runs: these flags or top-level keys; for several stages, `stages:` in "
    "--config, a list of mappings of these keys)"
)


@dataclass
class Stage:
    """One phase of a run: its data, length and loss. Stages continue one run (weights, optimizer)."""

    cache: list[str] = setting(
        default_factory=list,
        group=SINGLE_STAGE,
        metavar="DIR",
        help="teacher cache folder or URL; repeat (or comma-separate) to mix caches round-robin by example",
    )
    steps: int | None = setting(None, help="optimizer steps in this stage (default: until the data runs out)")
    epochs: int | None = setting(1, help="passes over the caches (0 = repeat until --steps)")
    max_examples: int | None = setting(
        None, metavar="N", help="use only the first N examples of each cache, in cache order (data-size sweeps)"
    )
    fraction: float = setting(
        1.0,
        metavar="F",
        help="train on a deterministic, nested subsample of the examples "
        "(hash of the record id; the same records `kdcache cache --fraction F` keeps): "
        "data-size sweeps",
    )
    kd_weight: float = setting(
        1.0,
        group="stage loss: total = ce_weight * CE + kd_weight * tau^2 * KD",
        help="weight of the KD term tau^2 * KL(teacher || student) (0 = SFT on the same tokens)",
    )
    ce_weight: float = setting(0.0, help="weight of next-token cross-entropy")
    temperature: float = setting(1.0, help="KD temperature tau")
    uld_weight: float = setting(
        1.0,
        help="weight of the ULD term (cross-tokenizer students, modes uld and hybrid: "
        "aligned positions without a 1:1 token match; docs/CROSS_TOKENIZER.md)",
    )
    kind: str = setting("forward_kl", choices=KINDS, help="KD divergence")
    tail: str = setting(
        "renormalize", choices=TAILS, help="teacher mass outside its top-k: renormalize the top-k, or one tail bucket"
    )
    name: str = setting("", flag=False, help="shown in logs; default stage<i>")


@dataclass
class TrainConfig:
    student: str | None = setting(
        None, group="student", metavar="ID_OR_DIR", help="student: HF hub id or checkpoint folder"
    )
    init_from_teacher: str | None = setting(
        None,
        metavar="DIR",
        help="build the student as a layer-pruned copy of this teacher folder (saved to OUT/student-init)",
    )
    keep_layers: list[int] | None = setting(
        None, metavar="I,J,...", help="with --init-from-teacher: teacher layers to keep, e.g. 0,5,10,15,20,29"
    )
    tokenizer: str | None = setting(None, help="tokenizer folder or hub id, if not the student's", metavar="ID_OR_DIR")
    dtype: str = setting(
        "auto",
        choices=STUDENT_DTYPES,
        help="auto: bf16-mixed where the device computes bf16 "
        "natively (CUDA compute capability >= 8, CPUs with amx_bf16 or avx512_bf16), else "
        "float32; float32; bfloat16 (weights and optimizer state too: least memory); bf16-mixed "
        "(fp32 weights and optimizer, bf16 compute: autocast, or FSDP2's mixed precision)",
    )
    gradient_checkpointing: bool = setting(False, help="recompute activations in backward (less memory)")
    compile: bool = setting(False, help="torch.compile the student's decoder")
    attn_implementation: str | None = setting(
        None,
        choices=ATTN_IMPLEMENTATIONS,
        help="attention kernel "
        "(default sdpa); packed examples stay apart with each "
        "(flash_attention_2 through its varlen path on CUDA)",
    )
    cross_tokenizer: str = setting(
        "auto",
        group="a student with another tokenizer (docs/CROSS_TOKENIZER.md)",
        choices=CROSS_TOKENIZER_MODES,
        help="auto: align to the cache's teacher "
        "tokenizer when the student's differs (hybrid), plain KD when it is the same; "
        "off: refuse a different tokenizer; exact-map, uld, hybrid: the cross-tokenizer "
        "loss",
    )
    student_template: str | None = setting(
        None,
        metavar="NAME_OR_FILE",
        help="the student's chat template when "
        "its tokenizer differs from the teacher's: a built-in (tulu3) or a "
        "Jinja file (default: the student tokenizer's own; base models have "
        "none)",
    )
    max_tokens: int = setting(
        4096, group="data", metavar="N", help="tokens per packed sequence (one micro-batch per process)"
    )
    long_examples: str = setting(
        "truncate",
        choices=LONG_EXAMPLES,
        help="an example longer than --max-tokens: "
        "truncate (train its first max-tokens tokens; the positions cut are counted) or "
        "skip it; one with nothing to train within max-tokens is always skipped (counted)",
    )
    grad_accum: int = setting(1, help="micro-batches per optimizer step and process", metavar="N")
    eval_fraction: float = setting(
        0.01, metavar="F", help="share of example ids held out for evaluation (by hash of the id)"
    )
    eval_max_examples: int | None = setting(
        256, metavar="N", help="held-out examples evaluated per process (null in YAML: all)"
    )
    shuffle: bool = setting(True, help="shuffle row groups and rows each epoch (seeded)")
    verify: bool = setting(
        True,
        help="check each shard's sha256 as it is read (--no-verify skips only the hash: "
        "sizes, bounds and values are always checked)",
    )
    allow_mixed_teachers: bool = setting(
        False, help="let one stage mix caches of different teachers (refused by default)"
    )
    seed: int = setting(0, help="seed of shuffling and initialization")
    impl: str = setting(
        "chunked",
        group="loss",
        choices=IMPLS,
        help="kd_loss implementation (naive materializes [T, V] logits; fused needs CUDA)",
    )
    chunk_size: int = setting(1024, help="tokens per chunk for --impl chunked")
    lr: float = setting(3e-4, group="optimizer (AdamW, linear warmup then cosine)", help="peak learning rate")
    min_lr_ratio: float = setting(0.1, help="final learning rate as a fraction of --lr")
    warmup_steps: int = setting(100, help="linear warmup steps")
    weight_decay: float = setting(0.01, help="AdamW weight decay (matrices only)")
    beta1: float = setting(0.9, help="AdamW beta1")
    beta2: float = setting(0.95, help="AdamW beta2")
    grad_clip: float = setting(1.0, help="max global gradient norm (0 = off)")
    out: str = setting(
        "runs/train", group="run", metavar="DIR", help="run folder: checkpoints/, final/, metrics.jsonl, tensorboard/"
    )
    eval_every: int = setting(200, metavar="N", help="steps between evaluations (0 = at start and end only)")
    save_every: int = setting(500, metavar="N", help="steps between checkpoints (0 = at the end only)")
    keep_checkpoints: int = setting(2, help="newest checkpoints kept", metavar="N")
    log_every: int = setting(10, help="steps between metrics.jsonl lines", metavar="N")
    push_to_hub: str | None = setting(
        None,
        metavar="REPO_ID",
        help="when the run finishes, upload final/ (weights, tokenizer, model card) to this hub model repo "
        "(USER/NAME, created public if missing; token: HF_TOKEN or `hf auth login`, checked before "
        "training starts)",
    )
    resume: bool = setting(False, help="continue from the newest checkpoint in --out")
    progress: bool = setting(True, help="progress bar (rank 0)")
    tensorboard: bool = setting(True, help="TensorBoard events (when installed)")
    fsdp: bool = setting(False, help="shard the student with FSDP2 (under torchrun)")
    checkpoint_format: str = setting(
        "auto",
        choices=CHECKPOINT_FORMATS,
        help="full: rank 0 gathers and writes "
        "HF weights + optimizer; sharded: every rank writes its shards "
        "(torch.distributed.checkpoint); auto: sharded under --fsdp",
    )
    device: str | None = setting(None, help="cpu, cuda (default: cuda when available)", metavar="DEV")
    stages: list[Stage] = setting(
        default_factory=list,
        flag=False,
        help="the stages of the run, in order (YAML only); without it, the top-level stage settings make one stage",
    )

    def __post_init__(self) -> None:
        self.stages = [s if s.name else dataclasses.replace(s, name=f"stage{i}") for i, s in enumerate(self.stages)]

    def resolved_stages(self) -> list[Stage]:
        """The stages to run, each named (stage<i> unless it has a name)."""
        return self.stages

    def validate(self) -> "TrainConfig":
        """Raise InputError on settings that cannot work, naming the field; return self."""
        check_choices(self)
        if not self.student and not self.init_from_teacher:
            raise InputError("no student: give --student MODEL or --init-from-teacher DIR --keep-layers ...")
        if self.student and self.init_from_teacher:
            raise InputError("give either --student or --init-from-teacher, not both")
        if self.init_from_teacher and not self.keep_layers:
            raise InputError("--init-from-teacher needs --keep-layers (e.g. 0,5,10,15,20,29)")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise InputError(f"eval_fraction={self.eval_fraction} must be in [0, 1)")
        for name in ("max_tokens", "grad_accum", "chunk_size", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise InputError(f"need lr > 0 and warmup_steps >= 0, got lr={self.lr}, warmup_steps={self.warmup_steps}")
        if not self.stages:
            raise InputError("no stage: give --cache DIR (or `stages:` in --config)")
        for i, s in enumerate(self.stages):
            _validate_stage(s, f"stage {i} ({s.name}): ", last=i == len(self.stages) - 1)
        return self


def _validate_stage(s: Stage, where: str, last: bool) -> None:
    check_choices(s, where)
    if not s.cache:
        raise InputError(f"{where}no cache; give --cache DIR (or `cache:` in the stage)")
    if s.kd_weight < 0 or s.ce_weight < 0 or s.kd_weight + s.ce_weight == 0:
        raise InputError(f"{where}need kd_weight, ce_weight >= 0, not both 0")
    if not 0.0 < s.fraction <= 1.0:
        raise InputError(f"{where}fraction={s.fraction} must be in (0, 1]")
    if not 0 <= s.uld_weight < float("inf"):
        raise InputError(f"{where}uld_weight={s.uld_weight} must be finite and >= 0")
    if s.temperature <= 0:
        raise InputError(f"{where}temperature={s.temperature} must be > 0")
    if s.steps is None and not s.epochs:
        raise InputError(f"{where}give steps or epochs (both unset would never end)")
    if s.steps is None and not last:
        raise InputError(f"{where}every stage but the last needs steps")


STAGE_SETTINGS = tuple(f.name for f in dataclasses.fields(Stage))


def make_config(config_file: str | Path | None = None, **flags) -> TrainConfig:
    """Defaults < YAML file < flags (keyword arguments; None values are ignored), through
    formats.common.settings.merge. Stage settings at the top level (file or flags) make the run's one stage;
    together with `stages:` they are an error (they used to be ignored silently)."""
    values = merge((TrainConfig, Stage), config_file, flags)
    single = {name: values.pop(name) for name in STAGE_SETTINGS if name in values}
    if not values.get("stages"):
        values["stages"] = [Stage(**single)]
    elif single:
        where = f"config file {config_file}" if config_file else "flags"
        raise InputError(
            f"{where}: `stages:` and the single-stage settings {', '.join(single)} (top-level keys or "
            "flags) are both given: a multi-stage run takes them inside each stage of `stages:`"
        )
    return TrainConfig(**values).validate()
