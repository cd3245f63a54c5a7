"""`kdcache train` and `kdcache plot`.

Every `train` flag maps onto a field of `train_student.config.TrainConfig` (a stage field when the
run has one stage); flags default to None so the value comes from --config FILE.yaml, else from
the dataclass default. Handlers import torch/transformers lazily.
"""
from __future__ import annotations

import argparse
import dataclasses

from train_student.config import CHECKPOINT_FORMATS, STUDENT_DTYPES, IMPLS, KINDS, TAILS, TrainConfig

_DEFAULTS = {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(TrainConfig)}


def _add(group, flag: str, help: str, **kwargs) -> None:
    dest = flag.lstrip("-").replace("-", "_")
    default = _DEFAULTS.get(dest)
    if kwargs.get("action") is argparse.BooleanOptionalAction:
        help = f"{help} (default: {'on' if default else 'off'})"
    elif default is not None and kwargs.get("action") != "append":
        help = f"{help} (default: {default})"
    group.add_argument(flag, dest=dest, default=None, help=help, **kwargs)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="YAML file of TrainConfig fields (long option names with _ for -; `stages:` for a "
                        "multi-stage run); flags override it")
    g = p.add_argument_group("student")
    _add(g, "--student", "student: HF hub id or checkpoint folder", metavar="ID_OR_DIR")
    _add(g, "--init-from-teacher", "build the student as a layer-pruned copy of this teacher folder "
         "(saved to OUT/student-init)", metavar="DIR")
    _add(g, "--keep-layers", "with --init-from-teacher: teacher layers to keep, e.g. 0,5,10,15,20,29", metavar="I,J,...")
    _add(g, "--tokenizer", "tokenizer folder or hub id, if not the student's", metavar="ID_OR_DIR")
    _add(g, "--dtype", "auto: bf16-mixed where the device computes bf16 natively (CUDA compute capability >= 8, "
         "CPUs with amx_bf16 or avx512_bf16), else float32; float32; bfloat16 (weights and optimizer state too: "
         "least memory); bf16-mixed (fp32 weights and optimizer, bf16 compute: autocast, or FSDP2's mixed "
         "precision)", choices=STUDENT_DTYPES)
    _add(g, "--gradient-checkpointing", "recompute activations in backward", action=argparse.BooleanOptionalAction)
    _add(g, "--compile", "torch.compile the student's decoder", action=argparse.BooleanOptionalAction)
    _add(g, "--attn-implementation", "attention kernel; packed examples stay apart with each (flash_attention_2 "
         "through its varlen path)", choices=("sdpa", "eager", "flash_attention_2"))
    g = p.add_argument_group("data (single-stage runs; use `stages:` in --config for several)")
    _add(g, "--cache", "teacher cache folder or URL; repeat to mix caches round-robin", action="append", metavar="DIR")
    _add(g, "--steps", "optimizer steps (default: until the data runs out)", type=int)
    _add(g, "--epochs", "passes over the cache (0 = repeat until --steps)", type=int)
    _add(g, "--max-examples", "use only the first N examples of each cache, in cache order", type=int, metavar="N")
    _add(g, "--fraction", "train on a deterministic, nested subsample of the examples (hash of the record id; "
         "the same records `kdcache cache --fraction F` keeps): data-size sweeps", type=float, metavar="F")
    _add(g, "--max-tokens", "tokens per packed sequence (one micro-batch per process)", type=int, metavar="N")
    _add(g, "--grad-accum", "micro-batches per optimizer step and process", type=int, metavar="N")
    _add(g, "--eval-fraction", "share of example ids held out for evaluation (by hash of the id)", type=float,
         metavar="F")
    _add(g, "--eval-max-examples", "held-out examples evaluated per process", type=int, metavar="N")
    _add(g, "--shuffle", "shuffle row groups and rows each epoch", action=argparse.BooleanOptionalAction)
    _add(g, "--seed", "seed of shuffling and initialization", type=int)
    _add(g, "--allow-mixed-teachers", "let one stage mix caches of different teachers (refused by default)",
         action=argparse.BooleanOptionalAction)
    g = p.add_argument_group("loss: total = ce_weight * CE + kd_weight * tau^2 * KD")
    _add(g, "--kd-weight", "weight of the KD term (0 = SFT on the same tokens)", type=float)
    _add(g, "--ce-weight", "weight of next-token cross-entropy", type=float)
    _add(g, "--temperature", "KD temperature tau", type=float)
    _add(g, "--kind", "KD divergence", choices=KINDS)
    _add(g, "--tail", "teacher mass outside its top-k: renormalize the top-k, or one tail bucket", choices=TAILS)
    _add(g, "--impl", "kd_loss implementation (naive materializes [T, V] logits; fused needs CUDA)", choices=IMPLS)
    _add(g, "--chunk-size", "tokens per chunk for --impl chunked", type=int)
    g = p.add_argument_group("optimizer (AdamW, linear warmup then cosine)")
    _add(g, "--lr", "peak learning rate", type=float)
    _add(g, "--min-lr-ratio", "final learning rate as a fraction of --lr", type=float)
    _add(g, "--warmup-steps", "linear warmup steps", type=int)
    _add(g, "--weight-decay", "AdamW weight decay (matrices only)", type=float)
    _add(g, "--beta1", "AdamW beta1", type=float)
    _add(g, "--beta2", "AdamW beta2", type=float)
    _add(g, "--grad-clip", "max global gradient norm (0 = off)", type=float)
    g = p.add_argument_group("run")
    _add(g, "--out", "run folder: checkpoints/, final/, metrics.jsonl, tensorboard/", metavar="DIR")
    _add(g, "--eval-every", "steps between evaluations (0 = at start and end only)", type=int, metavar="N")
    _add(g, "--save-every", "steps between checkpoints (0 = at the end only)", type=int, metavar="N")
    _add(g, "--keep-checkpoints", "newest checkpoints kept", type=int, metavar="N")
    _add(g, "--log-every", "steps between metrics.jsonl lines", type=int, metavar="N")
    _add(g, "--resume", "continue from the newest checkpoint in --out", action=argparse.BooleanOptionalAction)
    _add(g, "--progress", "progress bar", action=argparse.BooleanOptionalAction)
    _add(g, "--tensorboard", "TensorBoard events (when installed)", action=argparse.BooleanOptionalAction)
    _add(g, "--fsdp", "shard the student with FSDP2 (under torchrun)", action=argparse.BooleanOptionalAction)
    _add(g, "--checkpoint-format", "full: rank 0 gathers and writes HF weights + optimizer; sharded: every rank "
         "writes its shards (torch.distributed.checkpoint); auto: sharded under --fsdp", choices=CHECKPOINT_FORMATS)
    _add(g, "--device", "cpu, cuda (default: cuda when available)", metavar="DEV")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from train_student.config import make_config

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return make_config(args.config, **overrides)


def _train(args: argparse.Namespace) -> int:
    from train_student.train import run

    return run(config_from_args(args))


def _plot(args: argparse.Namespace) -> int:
    from train_student.plot import plot_runs

    for path in plot_runs(args.runs, out=args.out):
        print(path)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a student from teacher caches (KD, SFT, multi-stage; DDP/FSDP under torchrun)",
        description="Train a student LM from cached teacher top-k logprobs. Under torchrun "
                    "(`torchrun --nproc-per-node N -m train_student train ...`) it runs DDP, or FSDP2 with --fsdp.")
    add_train_arguments(p)
    p.set_defaults(func=_train)

    p = subparsers.add_parser("plot", help="loss curves of training runs as PNG",
                              description="Plot train loss and held-out KL/CE of one or more runs (their "
                                          "metrics.jsonl) into PNG files.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the PNGs (default: the first run folder)")
    p.set_defaults(func=_plot)
