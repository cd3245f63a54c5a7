"""Training settings: one dataclass (`TrainConfig`) whose fields map 1:1 onto YAML keys and CLI flags.

A run is a list of stages (`Stage`). A single-stage run may give the stage's fields at the top
level (`cache`, `steps`, `kd_weight`, ...); a multi-stage run lists them under `stages:`

    student: runs/student-init
    stages:
      - {cache: [caches/generate], steps: 2000, kd_weight: 1.0, ce_weight: 0.0}
      - {cache: [caches/tulu], steps: 1000, kd_weight: 0.5, ce_weight: 0.5}

Precedence: dataclass defaults < YAML file < command-line flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from formats.errors import InputError
from train_student.loss_options import IMPLS, KINDS, TAILS  # noqa: F401  (defined once; the CLI imports them here)

STUDENT_DTYPES = ("auto", "float32", "bfloat16", "bf16-mixed")
CHECKPOINT_FORMATS = ("auto", "full", "sharded")  # train_student/checkpoint.py


@dataclass
class Stage:
    """One phase of a run: its data, length and loss. Stages continue one run (weights, optimizer)."""

    cache: list[str] = field(default_factory=list)  # cache folders/URLs, mixed round-robin by example
    steps: int | None = None        # optimizer steps in this stage; None = until the data runs out
    epochs: int | None = 1          # passes over the caches (0 or None = repeat until `steps`)
    max_examples: int | None = None  # per cache, for data-size sweeps (a prefix in cache order)
    fraction: float = 1.0           # deterministic, nested subsample of the training examples (by id hash)
    kd_weight: float = 1.0          # weight of tau^2 * KL(teacher || student); 0 = SFT on the same tokens
    ce_weight: float = 0.0          # weight of the next-token cross-entropy
    temperature: float = 1.0        # KD temperature tau
    kind: str = "forward_kl"        # forward_kl | reverse_kl
    tail: str = "renormalize"       # renormalize | bucket (teacher mass outside its top-k)
    name: str = ""                  # shown in logs; defaults to stage<i>


@dataclass
class TrainConfig:
    # -- student --------------------------------------------------------------------------------
    student: str | None = None           # HF hub id or folder of the student (or use init_from_teacher)
    init_from_teacher: str | None = None  # teacher folder: the student is a layer-pruned copy of it
    keep_layers: list[int] | None = None  # with init_from_teacher: teacher layer indices to keep
    tokenizer: str | None = None          # defaults to the student's (or the teacher's) folder
    dtype: str = "auto"                   # auto (bf16-mixed where bf16 is native, else float32) | float32 |
                                          # bfloat16 (weights too) | bf16-mixed (fp32 weights, bf16 compute)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)
    compile: bool = False                 # torch.compile the student
    attn_implementation: str | None = None  # sdpa (default) | eager | flash_attention_2 (varlen on CUDA)
    # -- data -----------------------------------------------------------------------------------
    out: str = "runs/train"              # run folder: checkpoints, metrics.jsonl, tensorboard
    max_tokens: int = 4096               # tokens per packed sequence (one micro-batch per rank)
    grad_accum: int = 1                  # micro-batches per optimizer step (per rank)
    eval_fraction: float = 0.01          # share of example ids held out (hash of the id)
    eval_max_examples: int | None = 256  # held-out examples evaluated (per rank), None = all
    shuffle: bool = True                 # shuffle row groups and rows (per epoch, seeded)
    allow_mixed_teachers: bool = False   # let one stage mix caches of different teachers (refused by default)
    seed: int = 0
    # -- loss -----------------------------------------------------------------------------------
    impl: str = "chunked"                # kd_loss implementation: naive | chunked | fused
    chunk_size: int = 1024               # tokens per chunk for impl=chunked
    # -- optimizer ------------------------------------------------------------------------------
    lr: float = 3e-4
    min_lr_ratio: float = 0.1            # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0               # max gradient norm (0 = off)
    # -- loop -----------------------------------------------------------------------------------
    eval_every: int = 200                # optimizer steps between evaluations (0 = only at the end)
    save_every: int = 500                # optimizer steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2            # newest checkpoints kept on disk
    log_every: int = 10                  # steps between metrics.jsonl lines
    resume: bool = False                 # continue from the newest checkpoint in `out`
    progress: bool = True                # tqdm progress bar (rank 0)
    tensorboard: bool = True             # also write TensorBoard events when it is installed
    fsdp: bool = False                   # shard the student with FSDP2 (under torchrun)
    checkpoint_format: str = "auto"      # auto: sharded (DCP, no full gather) under FSDP, else full (one file)
    device: str | None = None            # default: cuda when available, else cpu
    # -- single-stage shorthand (ignored when `stages` is given) ---------------------------------
    cache: list[str] = field(default_factory=list)
    steps: int | None = None
    epochs: int | None = 1
    max_examples: int | None = None
    fraction: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    kind: str = "forward_kl"
    tail: str = "renormalize"
    stages: list[Stage] = field(default_factory=list)

    def resolved_stages(self) -> list[Stage]:
        """The stages to run: `stages`, or one stage made from the top-level shorthand."""
        if self.stages:
            return [s if s.name else dataclasses.replace(s, name=f"stage{i}") for i, s in enumerate(self.stages)]
        fields = {f.name for f in dataclasses.fields(Stage)} - {"name"}
        return [Stage(**{k: getattr(self, k) for k in fields}, name="stage0")]

    def validate(self) -> None:
        """Raise InputError on settings that cannot work, naming the field."""
        if not self.student and not self.init_from_teacher:
            raise InputError("no student: give --student MODEL or --init-from-teacher DIR --keep-layers ...")
        if self.student and self.init_from_teacher:
            raise InputError("give either --student or --init-from-teacher, not both")
        if self.init_from_teacher and not self.keep_layers:
            raise InputError("--init-from-teacher needs --keep-layers (e.g. 0,5,10,15,20,29)")
        if self.dtype not in STUDENT_DTYPES:
            raise InputError(f"dtype must be one of {STUDENT_DTYPES}, got {self.dtype!r}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise InputError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {self.checkpoint_format!r}")
        if self.impl not in IMPLS:
            raise InputError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise InputError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("max_tokens", "grad_accum", "chunk_size", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise InputError(f"need lr > 0 and warmup_steps >= 0, got lr={self.lr}, warmup_steps={self.warmup_steps}")
        stages = self.resolved_stages()
        for i, s in enumerate(stages):
            where = f"stage {i} ({s.name})"
            if not s.cache:
                raise InputError(f"{where}: no cache; give --cache DIR (or `cache:` in the stage)")
            if s.kind not in KINDS:
                raise InputError(f"{where}: kind must be one of {KINDS}, got {s.kind!r}")
            if s.tail not in TAILS:
                raise InputError(f"{where}: tail must be one of {TAILS}, got {s.tail!r}")
            if s.kd_weight < 0 or s.ce_weight < 0 or s.kd_weight + s.ce_weight == 0:
                raise InputError(f"{where}: need kd_weight, ce_weight >= 0, not both 0")
            if not 0.0 < s.fraction <= 1.0:
                raise InputError(f"{where}: fraction must be in (0, 1], got {s.fraction}")
            if s.temperature <= 0:
                raise InputError(f"{where}: temperature must be > 0, got {s.temperature}")
            if s.steps is None and not s.epochs:
                raise InputError(f"{where}: give steps or epochs (both unset would never end)")
            if s.steps is None and i < len(stages) - 1:
                raise InputError(f"{where}: every stage but the last needs steps")


def _coerce_stage(d: dict, where: str) -> Stage:
    names = {f.name for f in dataclasses.fields(Stage)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InputError(f"{where}: unknown stage keys {unknown}; known: {sorted(names)}")
    d = dict(d)
    if isinstance(d.get("cache"), str):
        d["cache"] = [d["cache"]]
    return Stage(**d)


def make_config(yaml_path: str | Path | None = None, **overrides) -> TrainConfig:
    """Defaults < YAML file < overrides (keyword arguments; None values are ignored)."""
    values: dict = {}
    if yaml_path is not None:
        import yaml

        path = Path(yaml_path)
        if not path.exists():
            raise InputError(f"config file {path} not found")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise InputError(f"{path}: expected a mapping of TrainConfig fields at the top level")
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"unknown config keys {unknown}; known: {sorted(names)}")
    if isinstance(values.get("cache"), str):
        values["cache"] = [values["cache"]]
    if isinstance(values.get("keep_layers"), str):
        values["keep_layers"] = parse_int_list(values["keep_layers"])
    values["stages"] = [s if isinstance(s, Stage) else _coerce_stage(s, f"stages[{i}]")
                        for i, s in enumerate(values.get("stages") or [])]
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def parse_int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise InputError(f"expected comma-separated integers (e.g. 0,5,10), got {text!r}") from None


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
