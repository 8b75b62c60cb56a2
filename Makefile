# rnn_ext: every target works from a fresh clone with nothing installed; it makes its own venv.
#   make test        build (CPU torch) and run the test suite
#   make demo        train the sine -> cosine example with nn.RNN and rnn_ext.RNN
#   make bench       CPU (and CUDA, where present) benchmark against nn.RNN
#   make fuzz        the long differential-fuzzing profile
#   make check-asan  the test suite on an AddressSanitizer + UBSan build
#   make check-cuda  compile the CUDA sources against the CUDA torch wheel (needs nvcc)
#   make check-cuda-emulated  run the CUDA kernels on the CPU under a host emulation (needs g++ and
#                    the CUDA headers, not a GPU)
#   make check-cuda-races     the emulated kernels under ThreadSanitizer, and proof that a removed
#                    barrier is caught
#   make dist-check  build the sdist from a clean export of HEAD, a wheel from it, install, smoke-test

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CUDA_TORCH ?= torch==2.14.1
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEPS := ninja pybind11 pytest hypothesis numpy matplotlib tqdm expecttest onnx onnxruntime onnxscript
SOURCES := $(shell find csrc -type f) setup.py
EXTENSION := $(VENV)/.rnn_ext-built

.PHONY: all venv build test demo bench fuzz check-asan check-cuda check-cuda-emulated check-cuda-races dist-check clean

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

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) examples/sine_to_cosine.py

bench: build
	$(PY) benchmarks/bench.py

fuzz: build
	RNN_EXT_FUZZ_PROFILE=long $(PY) -m pytest -q tests/test_fuzz.py

check-asan: $(VENV)/.deps-installed
	bash scripts/check_asan.sh

check-cuda:
	CUDA_TORCH="$(CUDA_TORCH)" bash scripts/check_cuda.sh

check-cuda-emulated: build
	$(PY) -m pytest -q tests/test_cuda_emulation.py

check-cuda-races:
	$(PYTHON) tests/cuda_emulation/build.py races
	$(PYTHON) tests/cuda_emulation/build.py planted

# Its own venv and a temporary folder: nothing here is used or touched. Two compile jobs, as on CI.
dist-check:
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" MAX_JOBS=$${MAX_JOBS:-2} bash scripts/dist_check.sh

clean:
	rm -rf build build-* dist $(VENV) .venv-* rnn_ext/*.so rnn_ext/_build_info.py *.egg-info
