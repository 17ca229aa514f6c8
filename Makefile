# fastbind: `make demo` and `make test` work from a fresh clone; everything goes into .venv.
PY_SYS  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.fastbind-deps
# Tests run the Triton kernels on CPU tensors through Triton's interpreter.
TEST_ENV := TRITON_INTERPRET=1 OMP_NUM_THREADS=2

.PHONY: venv build demo test bench lint format clean

venv: $(STAMP)

# Re-installs only when the pinned requirements change (idempotent otherwise).
$(STAMP): requirements-dev.txt
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	FASTBIND_NO_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Incremental (ninja) build of the C++ extension fastbind._C next to the sources.
build: venv
	flock .build.lock $(PY) setup.py -q build_ext --inplace

test: build
	$(TEST_ENV) $(PY) -m pytest -q -ra tests

demo: build
	$(VENV)/bin/fastbind info
	$(VENV)/bin/fastbind bench all --quick
	$(VENV)/bin/fastbind train --compare --quick

bench: build
	$(VENV)/bin/fastbind bench all

lint: venv
	$(VENV)/bin/ruff check fastbind benchmarks tests setup.py
	$(VENV)/bin/ruff format --check fastbind benchmarks tests setup.py

format: venv
	$(VENV)/bin/ruff format fastbind benchmarks tests setup.py
	$(VENV)/bin/ruff check --fix fastbind benchmarks tests setup.py

clean:
	rm -rf build fastbind/*.so
