# rnn_ext: every target works from a fresh clone with nothing installed; it makes its own venv.
#   make test        build (CPU torch) and run the product's tests (CUDA cases reported as skipped)
#   make test-slow / test-tooling / test-cuda   one test tier each (markers in pyproject.toml)
#   make check       everything CI runs: lint, every test tier, the CUDA compile and emulation checks,
#                    the packaging check
#   make lint        ruff (lint + format) and clang-format, checked; `make format` rewrites
#   make demo        train the sine -> cosine example with nn.RNN and rnn_ext.RNN
#   make bench       CPU (and CUDA, where present) benchmark against every peer (installs OpenVINO
#                    and JAX into the venv), then the bfloat16 benchmark and the per-call split
#   make fuzz        the long differential-fuzzing profile
#   make check-asan  the test suite on an AddressSanitizer + UBSan build
#   make check-cuda  compile the CUDA sources against the CUDA torch wheel (needs nvcc)
#   make check-cuda-emulated  run the CUDA kernels on the CPU under a host emulation (needs g++ and
#                    the CUDA headers, not a GPU)
#   make check-cuda-races     the emulated kernels under ThreadSanitizer, and proof that a removed
#                    barrier is caught
#   make dist-check  build the sdist from a clean export of HEAD, a wheel from it, install, smoke-test
#   make check-torch-range  build HEAD against the oldest supported torch (OLDEST_TORCH) in its own
#                    venv and run a quick subset of the tests (downloads that torch, ~3 GB)

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CUDA_TORCH ?= torch==2.14.1
OLDEST_TORCH ?= torch==2.11.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEPS := ninja pybind11 pytest hypothesis numpy matplotlib tqdm expecttest onnx onnxruntime onnxscript opacus
SOURCES := $(shell find csrc -type f) setup.py
EXTENSION := $(VENV)/.rnn_ext-built
# The benchmark's optional peers, installed by `make bench` only (neither pins nor replaces torch).
BENCH_DEPS := openvino "jax[cpu]"

.PHONY: all venv build test test-slow test-cuda test-tooling check lint format demo bench fuzz check-asan check-cuda \
	check-cuda-emulated check-cuda-races dist-check check-torch-range clean

all: test

# Remade when the Makefile changes, so a new entry in DEPS reaches an existing venv.
$(VENV)/.deps-installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)" $(DEPS)
	touch $@

venv: $(VENV)/.deps-installed

# Editable install once (so `import rnn_ext` works from anywhere in the venv); later builds are
# incremental ninja rebuilds of the extension in place.
$(EXTENSION): $(VENV)/.deps-installed $(SOURCES)
	@if [ ! -f $(VENV)/.rnn_ext-installed ]; then \
	  RNN_EXT_CUDA=0 MAX_JOBS=$$(nproc) $(PIP) install --quiet --no-build-isolation --no-deps -e . && \
	  touch $(VENV)/.rnn_ext-installed; \
	else \
	  RNN_EXT_CUDA=0 MAX_JOBS=$$(nproc) $(PY) setup.py --quiet build_ext --inplace; \
	fi
	touch $@

build: $(EXTENSION)

# Tiers are pytest markers declared in pyproject.toml. `make test` runs the product's tests, CUDA ones
# included (reported as skipped without a GPU); the slow, emulation and tooling tiers have targets of
# their own, and `make check` runs them all.
test: build
	$(PY) -m pytest -q tests -m "not slow and not emulation and not tooling"

test-slow: build
	$(PY) -m pytest -q tests -m slow

# The CUDA-only tests report themselves as skipped without a GPU.
test-cuda: build
	$(PY) -m pytest -q -rs tests -m cuda

test-tooling: build
	$(PY) -m pytest -q tools

check: lint test test-slow test-tooling check-cuda check-cuda-emulated dist-check

LINT_VENV ?= .venv-lint
LINT_DEPS := ruff==0.17.6 clang-format==23.1.5
CXX_SOURCES = $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' \
	'tests/cuda_emulation/*.h' 'tests/cuda_emulation/*.cpp' 'tests/cuda_emulation/include/*.h')

$(LINT_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install --quiet $(LINT_DEPS)
	touch $@

lint: $(LINT_VENV)/.installed
	$(LINT_VENV)/bin/ruff check .
	$(LINT_VENV)/bin/ruff format --check .
	$(LINT_VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(LINT_VENV)/.installed
	$(LINT_VENV)/bin/ruff check --fix .
	$(LINT_VENV)/bin/ruff format .
	$(LINT_VENV)/bin/clang-format -i $(CXX_SOURCES)

demo: build
	$(PY) examples/sine_to_cosine.py

$(VENV)/.bench-deps-installed: $(VENV)/.deps-installed
	$(PIP) install --quiet $(BENCH_DEPS)
	touch $@

bench: build $(VENV)/.bench-deps-installed
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/bf16.py
	$(PY) benchmarks/call_cost.py

fuzz: build
	RNN_EXT_FUZZ_PROFILE=long $(PY) -m pytest -q tests/test_fuzz.py

check-asan: $(VENV)/.deps-installed
	bash scripts/check_asan.sh

check-cuda:
	CUDA_TORCH="$(CUDA_TORCH)" bash tools/gpu/check_cuda.sh

check-cuda-emulated: build
	$(PY) -m pytest -q tests -m emulation

check-cuda-races:
	$(PYTHON) tests/cuda_emulation/build.py races
	$(PYTHON) tests/cuda_emulation/build.py planted

# Its own venv and a temporary folder: nothing here is used or touched. Two compile jobs, as on CI.
dist-check:
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" MAX_JOBS=$${MAX_JOBS:-2} bash scripts/dist_check.sh

check-torch-range:
	PYTHON="$(PYTHON)" TORCH="$(OLDEST_TORCH)" MAX_JOBS=$${MAX_JOBS:-2} bash scripts/check_torch_range.sh

clean:
	rm -rf build build-* dist $(VENV) $(LINT_VENV) .venv-* rnn_ext/*.so rnn_ext/_build_info.py *.egg-info
