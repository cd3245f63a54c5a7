"""`kdcache train`.

The `train` flags are generated from the fields of `train_student.config.TrainConfig` and its `Stage`
(formats.common.settings; the stage flags make a single-stage run's one stage); they default to None so the
value comes from --config FILE.yaml, else from the dataclass default. Handlers import
torch/transformers lazily.
"""

from __future__ import annotations

import argparse

from formats.common.settings import add_flags, flags_given
from train_student.config import Stage, TrainConfig


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, TrainConfig, Stage)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from train_student.config import make_config

    return make_config(args.config, **flags_given(args, TrainConfig, Stage))


def _train(args: argparse.Namespace) -> int:
    from train_student.train import run

    return run(config_from_args(args))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a student from teacher caches (KD, SFT, multi-stage; DDP/FSDP under torchrun)",
        description="Train a student LM from cached teacher top-k logprobs. Under torchrun "
        "(`torchrun --nproc-per-node N -m train_student train ...`) it runs DDP, or FSDP2 with --fsdp.",
    )
    add_train_arguments(p)
    p.set_defaults(func=_train)
