# fastbind: `make demo` and `make test` work from a fresh clone; everything goes into .venv.
PY_SYS  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.fastbind-deps
BSTAMP  := $(VENV)/.fastbind-bench-deps
# Without a CUDA GPU, tests/conftest.py sets TRITON_INTERPRET=1 (Triton kernels on CPU tensors
# through the interpreter); with one, it leaves it unset so the kernels compile and run on the GPU.
# Forcing it here would turn a GPU machine's suite back into the CPU suite.
TEST_ENV := OMP_NUM_THREADS=2

.PHONY: venv bench-deps build demo test bench lint format clean

venv: $(STAMP)
bench-deps: $(BSTAMP)

# Re-installs only when the pinned requirements change (idempotent otherwise).
$(STAMP): requirements-dev.txt
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	FASTBIND_NO_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Benchmark-only peers (faiss-cpu, vector-quantize-pytorch); --no-deps keeps the pinned CPU torch.
$(BSTAMP): requirements-bench.txt $(STAMP)
	$(PY) -m pip install -q --no-deps -r requirements-bench.txt
	touch $@

# Incremental (ninja) build of the C++ extension fastbind._C next to the sources.
build: venv
	flock .build.lock $(PY) setup.py -q build_ext --inplace

test: build
	$(TEST_ENV) $(PY) -m pytest -q -ra tests

demo: build bench-deps
	$(VENV)/bin/fastbind info
	$(VENV)/bin/fastbind bench all --quick
	$(VENV)/bin/fastbind train --compare --quick

bench: build bench-deps
	$(VENV)/bin/fastbind bench all

lint: venv
	$(VENV)/bin/ruff check fastbind benchmarks tests setup.py
	$(VENV)/bin/ruff format --check fastbind benchmarks tests setup.py

format: venv
	$(VENV)/bin/ruff format fastbind benchmarks tests setup.py
	$(VENV)/bin/ruff check --fix fastbind benchmarks tests setup.py

clean:
	rm -rf build fastbind/*.so
