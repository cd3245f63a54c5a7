"""Every path and command the README and docs/ cite exists (issue 20, item 12): a doc that names a config
that is not there, or a subcommand or flag the CLI does not have, fails here; the cheap commands run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(REPO.glob("*/README.md"))]
PATH = re.compile(
    r"(?<![\w./-])((?:configs|docs|bench|tests|formats|train_student|cache_teacher|kdcache)/[A-Za-z0-9_./-]+)"
)
GENERATED = ("bench/data/",)  # made by `make bench-data`; ignored by git
COMMAND = re.compile(r"(?<![\w/.-])kdcache ([a-z][a-z-]+)")
CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)  # fenced blocks and inline code: where commands are


def commands(doc: Path) -> set[str]:
    return {cmd for code in CODE.findall(doc.read_text()) for cmd in COMMAND.findall(code)}


def cited_paths() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for path in PATH.findall(doc.read_text()):
            path = path.rstrip(".,:;")
            if not path.startswith(GENERATED) and "*" not in path:
                out.append((doc.relative_to(REPO).as_posix(), path))
    return sorted(set(out))


@pytest.mark.parametrize("doc,path", cited_paths())
def test_every_cited_path_exists(doc, path):
    assert (REPO / path).exists(), f"{doc} cites {path}, which does not exist"


def subcommands() -> set[str]:
    from kdcache.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)


def test_every_cited_kdcache_command_exists():
    known = subcommands()
    cited = {(doc.name, cmd) for doc in DOCS for cmd in commands(doc)}
    missing = sorted((doc, cmd) for doc, cmd in cited if cmd not in known)
    assert not missing, f"docs cite kdcache subcommands that do not exist: {missing}"


@pytest.mark.multiprocess
def test_every_cited_command_answers_help():
    """The cheap run: `kdcache <command> --help` for every command the docs cite."""
    cited = sorted({cmd for doc in DOCS for cmd in commands(doc)} & subcommands())
    for cmd in cited:
        r = subprocess.run(
            [sys.executable, "-m", "kdcache.cli", cmd, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert r.returncode == 0, f"kdcache {cmd} --help: {r.stderr[-500:]}"
