# Single entry point. The two quick-start commands:
#   make bench   run the benchmark suite on the default device (CUDA if present, else CPU)
#   make test    run the test suite
# Each creates or reuses the project venv (.venv) and first builds the extension if its
# sources or build settings changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.14.1
DEPS_STAMP := $(VENV)/.deps-installed
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: test bench build lint format venv clean FORCE

venv: $(DEPS_STAMP)

# torch first, pinned, so no later install pulls another multi-GB copy; then the
# project's extras. Re-run when pyproject.toml changes.
$(DEPS_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet ninja pytest pytest-benchmark ruff numpy tqdm \
		"peft>=0.13" "transformers>=4.45" safetensors accelerate matplotlib \
		"bitsandbytes>=0.45"
	@touch $@

# The extension is rebuilt only when its sources, the build files or the build
# settings changed since the last build (pip's editable build starts from an
# empty build directory every time, so each build compiles every source).
BUILD_STAMP := $(VENV)/.extension-built
BUILD_SETTINGS := $(VENV)/.extension-settings
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f)

# A stamp without the module it stands for (deleted by hand) is stale.
ifeq ($(wildcard lora_kernels/_C*.so),)
$(shell rm -f $(BUILD_STAMP))
endif

build: $(BUILD_STAMP)

$(BUILD_SETTINGS): FORCE | venv
	@echo "TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) LORA_KERNELS_BUILD_CUDA=$(LORA_KERNELS_BUILD_CUDA)" \
		| cmp -s - $@ || echo "TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) LORA_KERNELS_BUILD_CUDA=$(LORA_KERNELS_BUILD_CUDA)" > $@

$(BUILD_STAMP): $(DEPS_STAMP) $(BUILD_SETTINGS) $(BUILD_INPUTS)
	@echo "building lora_kernels._C (a build with CUDA sources takes a few minutes)"
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	@touch $@

FORCE:

test: build
	LORA_KERNELS_REQUIRE_EXTENSION=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf build *.egg-info lora_kernels/_C*.so $(BUILD_STAMP) $(BUILD_SETTINGS)
