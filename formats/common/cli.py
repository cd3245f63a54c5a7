"""The one-line error runner both entry points share (`kdcache`, `python -m train_student`): a KDCacheError or an
operational OSError (a full disk, a file size limit, a read-only or forbidden folder) or an install problem (a module
of an extra that is not installed, a torchvision that cannot load: formats.common.requirements) is one line on
stderr saying what, where and what to do, and exit status 1; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import sys

from formats.common.requirements import install_hint
from formats.errors import KDCacheError


def run_command(parser, args, prog: str) -> int:
    """Run the subcommand argparse chose (`args.func`); a KDCacheError prints one line (what, where, how
    to fix), not a traceback. The entry points `kdcache` and `python -m train_student` share it."""
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KDCacheError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine, not kdcache: one line with the path and what to do
        hint = OS_ERROR_HINTS.get(exc.errno)
        if hint is None:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog} {args.command}: error: {exc.strerror}{where}; {hint}", file=sys.stderr)
        return 1
    except (ImportError, RuntimeError) as exc:  # an extra not installed (matplotlib for plot, ...), torchvision's trap
        hint = install_hint(exc)
        if hint is None:
            raise
        print(f"{prog} {args.command}: error: {hint}", file=sys.stderr)
        return 1


_RERUN = (
    "then rerun the same command: a cache job resumes from what was completely written, and a file "
    "being written when it stopped is discarded, never trusted"
)
OS_ERROR_HINTS = {
    errno.ENOSPC: f"free space on that file system (or write to another folder), {_RERUN}",
    errno.EDQUOT: f"the disk quota is used up: free space or raise the quota, {_RERUN}",
    errno.EFBIG: f"a file size limit is in force (`ulimit -f`): raise it, or lower --shard-max-bytes, {_RERUN}",
    errno.EROFS: "that file system is read-only: write to a folder on a writable one (--out)",
    errno.EACCES: "no permission to write there: write to a folder you own (--out), or fix its permissions",
    errno.EPERM: "the operation is not permitted there: write to a folder you own (--out)",
    errno.EISDIR: "a folder is where a file was expected: give a file path, or remove the folder",
    errno.ENOTDIR: "a file is where a folder was expected: give a folder path, or remove the file",
    errno.EEXIST: "something already exists there (a file where a folder should be?): give a new path",
}
