"""Every YAML under configs/ maps onto its dataclass (config files mirror the code); the bundled lm-eval task
YAMLs (kdcache/study/tasks/, package data) load with lm-eval's own loader."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "kdcache" / "study" / "tasks"
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml")) + sorted(TASKS.glob("*.yaml"))


def is_train_config(data: dict) -> bool:
    return any(key in data for key in ("student", "init_from_teacher", "stages", "kd_weight", "impl"))


def test_both_stages_have_config_files():
    assert any(p.parent.name == "cache" for p in CONFIGS) and any(p.parent.name == "train" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_loads(path):
    """The one test that loads every YAML under configs/ (as a file, through each stage's make_config)."""
    if path.parent == TASKS:  # lm-eval task files (`!function` tags): lm-eval's own loader
        from lm_eval.tasks._yaml_loader import load_yaml as load_task_yaml

        assert callable(load_task_yaml(path)["custom_dataset"])
        return
    data = yaml.safe_load(path.read_text())
    if is_train_config(data):
        from train_student.config import make_config

        # shared bases (configs/paper/train_base.yaml) get their cache from the launch script's flags
        cfg = make_config(path, **({} if ("cache" in data or "stages" in data) else {"cache": ["caches/x"]}))
        stages = cfg.resolved_stages()
        assert stages and all(s.kd_weight + s.ce_weight > 0 for s in stages)
        if path.parent.name == "train":
            assert make_config(path).resolved_stages()
    else:
        from cache_teacher.config import make_config

        # paper recipes leave teacher, dataset and out to the launch script's flags
        cfg = make_config(path, **{key: "org/x" for key in ("teacher", "dataset", "out") if key not in data})
        assert cfg.k >= 1


def test_paper_recipes_cover_the_study():
    paper = {p.name for p in (ROOT / "configs" / "paper").iterdir()}
    assert {"slurm_cache.sbatch", "train_ladder.sh", "train_teachers.sh", "two_stage.yaml", "README.md"} <= paper
    ladder = (ROOT / "configs" / "paper" / "train_ladder.sh").read_text()
    assert "--fraction" in ladder and "--kd-weight 0" in ladder


def test_paper_scripts_flags_exist_and_build_their_configs():
    """The flags the launch scripts pass (generated from the dataclasses) exist, and build configs."""
    import re

    import kdcache.cli as kdcache_cli
    from cache_teacher.cli import config_from_args as cache_config
    from train_student.cli import config_from_args as train_config

    parser = kdcache_cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    known = set(commands["train"]._option_string_actions) | set(commands["cache"]._option_string_actions)
    scripts = {"train_ladder.sh", "train_teachers.sh", "slurm_cache.sbatch"}
    text = "\n".join((ROOT / "configs" / "paper" / name).read_text() for name in scripts)
    text = re.sub(r"(?m)^\s*#.*$|torchrun --nproc-per-node", "", text)  # comments, torchrun's own flag
    assert set(re.findall(r"\s(--[a-z][a-z0-9-]*)", text)) <= known
    train = train_config(
        parser.parse_args(
            [
                "train",
                "--config",
                "configs/paper/train_base.yaml",
                "--cache",
                "c",
                "--fraction",
                "0.1",
                "--kd-weight",
                "0",
                "--ce-weight",
                "1",
                "--out",
                "runs/x",
            ]
        )
    )
    assert [(s.cache, s.fraction, s.kd_weight, s.ce_weight, s.tail) for s in train.stages] == [
        (["c"], 0.1, 0.0, 1.0, "bucket")
    ]
    cache = cache_config(
        parser.parse_args(
            [
                "cache",
                "--config",
                "configs/paper/cache_tulu3_llama8b.yaml",
                "--out",
                "runs/w3",
                "--num-workers",
                "8",
                "--worker-index",
                "3",
                "--no-progress",
            ]
        )
    )
    assert (cache.num_workers, cache.worker_index, cache.progress) == (8, 3, False)
