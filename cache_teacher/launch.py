"""Scale-out: run the N worker slices of one cache job as Ray tasks, then merge their caches.

    kdcache cache --launcher ray --num-workers 8 --gpus-per-worker 1 --ray-address auto ... --out runs/cache/x

Worker i writes `<out>.workers/worker-<i>-of-<N>` (a complete cache of slice i, resumable on its own),
and the merged cache goes to `<out>`. Rerunning the same command resumes: finished worker caches are
reused and unfinished ones continue.

Without Ray (e.g. SLURM array jobs): run one process per slice with the local launcher,

    kdcache cache ... --num-workers $N --worker-index $SLURM_ARRAY_TASK_ID --out runs/cache/x.workers/$SLURM_ARRAY_TASK_ID

then `kdcache merge runs/cache/x runs/cache/x.workers/*` once all have finished.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from pathlib import Path

from cache_teacher.provenance import check_finished_cache
from cache_teacher.summary import Summary

REPO_ROOT = Path(__file__).resolve().parents[1]


def worker_dirs(config) -> list[Path]:
    base = Path(config.out)
    parent = base.with_name(base.name + ".workers")
    return [parent / f"worker-{i:03d}-of-{config.num_workers:03d}" for i in range(config.num_workers)]


def worker_configs(config) -> list:
    """One config per slice: same settings, its own worker_index and output folder, no progress bar."""
    return [
        dataclasses.replace(config, worker_index=i, out=str(d), launcher="local", progress=False)
        for i, d in enumerate(worker_dirs(config))
    ]


def _run_worker(config_dict: dict) -> dict:
    from cache_teacher.config import CacheConfig
    from cache_teacher.run import run_cache

    return run_cache(CacheConfig(**config_dict).validate()).as_dict()


def merge(out, caches) -> None:
    """Join worker caches into `out` (formats.tools.merge_caches: disjointness and compatibility checked)."""
    from formats.tools import merge_caches

    merge_caches(out, [str(c) for c in caches])


def launch_ray(config) -> Summary:
    """Run every slice as a Ray task (local Ray when no --ray-address), then merge into config.out."""
    import ray

    check_finished_cache(config.out, worker_configs(config)[0])  # a merged cache of other settings: refuse now
    started = time.perf_counter()
    env = {
        "env_vars": {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
            "TOKENIZERS_PARALLELISM": "false",
        }
    }
    own = not ray.is_initialized()
    if own:
        if config.ray_address:
            ray.init(address=config.ray_address, runtime_env=env)
        else:
            ray.init(
                num_cpus=max(2, int(config.cpus_per_worker * config.num_workers)),
                runtime_env=env,
                include_dashboard=False,
            )
    try:
        task = ray.remote(num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker, max_retries=2)(_run_worker)
        refs = [task.remote(dataclasses.asdict(c)) for c in worker_configs(config)]
        results = ray.get(refs)
    finally:
        if own:
            ray.shutdown()
    if not (Path(config.out) / "manifest.json").exists():  # a rerun of a finished job: already merged
        merge(config.out, worker_dirs(config))
    summary = Summary(out=str(config.out))
    for r in results:
        for key in ("examples", "positions", "tokens", "resumed", "inputs", "truncated"):
            setattr(summary, key, getattr(summary, key) + r[key])
        summary.rejects += Counter(r["rejects"])
        summary.teacher_s = max(summary.teacher_s, r["teacher_s"])
    from formats.manifest import load_manifest

    summary.record_cache_size(load_manifest(config.out))
    summary.wall_s = time.perf_counter() - started
    return summary
