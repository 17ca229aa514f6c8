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

.PHONY: venv bench-deps build demo test bench lint format clean gpu-wheels gpu-check

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

# `make gpu-check` on a machine with a CUDA GPU and no network (benchmarks/README.md, "GPU check"):
# the system python with its CUDA torch and triton; pytest & co. come from gpu-wheels/, which
# `make gpu-wheels` fills here beforehand (python 3.12 wheels, ~19 MB; carry the folder along).
GPU_WHEELS ?= gpu-wheels
GPU_OUT    ?= $(if $(OUT),$(OUT),gpu-check-out)
gpu-wheels: venv
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(GPU_WHEELS) pytest==9.2.0 pytest-xdist==3.8.0 setuptools ninja==1.13.2 numpy==2.4.6
	du -sh $(GPU_WHEELS)

gpu-check:
	$(PY_SYS) -m benchmarks.gpu_check --out $(GPU_OUT) --wheels $(GPU_WHEELS)

lint: venv
	$(VENV)/bin/ruff check fastbind benchmarks tests setup.py
	$(VENV)/bin/ruff format --check fastbind benchmarks tests setup.py

format: venv
	$(VENV)/bin/ruff format fastbind benchmarks tests setup.py
	$(VENV)/bin/ruff check --fix fastbind benchmarks tests setup.py

clean:
	rm -rf build fastbind/*.so
