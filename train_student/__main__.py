"""`python -m train_student [train] ...`: the same command as `kdcache train`, for torchrun (`kdcache plot` draws runs).

    torchrun --nproc-per-node 2 -m train_student train --student S --cache C --out runs/ddp
A bare flag list (no subcommand) means `train`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "-h", "--help"):
        argv = ["train", *argv]
    parser = argparse.ArgumentParser(prog="python -m train_student")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from train_student.cli import register

    register(sub)
    from formats.common.cli import run_command

    return run_command(parser, parser.parse_args(argv), "train_student")


if __name__ == "__main__":
    sys.exit(main())
