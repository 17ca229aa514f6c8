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

.PHONY: venv bench-deps build demo test bench lint format clean gpu-wheels gpu-check cuda-build cuda-ext

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
# `make gpu-wheels` fills here beforehand (python 3.12 wheels, ~19 MB; carry the folder along), and
# fastbind._C with the CUDA kernels from build/cuda/lib (`make cuda-build`; carried along too, else
# the check builds it there). The device tool carries at most 64 MiB: gpu-wheels (run it after
# cuda-build) strips the CUDA build's debug info and checks the total.
GPU_WHEELS ?= gpu-wheels
GPU_OUT    ?= $(if $(OUT),$(OUT),gpu-check-out)
gpu-wheels: venv
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(GPU_WHEELS) pytest==9.2.0 pytest-xdist==3.8.0 setuptools ninja==1.13.2 numpy==2.4.6
	@# the CUDA fastbind._C of `make cuda-build` travels too; setup.py compiles with -g, and without
	@# that debug info the library is a fraction of its size (the CPU-only one: 17 MB -> 0.7 MB)
	for so in $(wildcard build/cuda/lib/fastbind/_C*.so); do strip --strip-debug $$so; done
	du -shc $(GPU_WHEELS) $(wildcard build/cuda/lib)
	test $$(du -smc $(GPU_WHEELS) $(wildcard build/cuda/lib) | tail -1 | cut -f1) -le 64 || \
	  { echo "gpu-wheels: over the 64 MiB the device tool carries"; false; }

gpu-check:
	$(PY_SYS) -m benchmarks.gpu_check --out $(GPU_OUT) --wheels $(GPU_WHEELS)

# `make cuda-build` (opt-in, not part of `make test`: the CUDA torch wheel and its nvidia libraries
# are ~4.7 GB): a separate venv with the CUDA build of torch that matches the GPU image (python 3.12,
# torch 2.11.0+cu130, nvcc 13.0), fastbind._C built with the CUDA kernels of csrc/cuda
# (FASTBIND_BUILD_CUDA=1) into build/cuda/lib (git-ignored; the in-place CPU extension stays as it
# is; the .so can be carried to the GPU machine), then loaded on this GPU-less machine by
# benchmarks/cuda_link_check.py, which checks that every op of every `cuda` row of the op tables
# (forward and backward) has a CUDA kernel. A plain `pip install torch==2.11.0` takes the cu130
# build; CUDA_TORCH_PIP: extra pip options (e.g. another index) where the registry offers another.
CUDA_PY_VERSION ?= 3.12
CUDA_PY        ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/$(CUDA_PY_VERSION).*/bin/python$(CUDA_PY_VERSION)) python$(CUDA_PY_VERSION))
CUDA_VENV      ?= $(HOME)/.cache/fastbind/cu130-venv
CUDA_HOME      ?= /usr/local/cuda-13.0
CUDA_TORCH     ?= 2.11.0
CUDA_VERSION   ?= 13.0
CUDA_TORCH_PIP ?=
CUDA_ARCHS     ?= 8.0;9.0a
CUDA_JOBS      ?= 2
CUDA_VPY       := $(CUDA_VENV)/bin/python
cuda-build:
	$(CUDA_VPY) -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$(CUDA_PY_VERSION)'" 2>/dev/null || \
	  { if [ -e $(CUDA_VENV)/pyvenv.cfg ]; then rm -rf $(CUDA_VENV); fi; $(CUDA_PY) -m venv $(CUDA_VENV); }
	$(CUDA_VPY) -c "import torch; assert torch.__version__ == '$(CUDA_TORCH)+cu' + '$(CUDA_VERSION)'.replace('.', '')" \
	  2>/dev/null || $(CUDA_VPY) -m pip install -q $(CUDA_TORCH_PIP) torch==$(CUDA_TORCH) numpy tqdm setuptools wheel ninja
	$(CUDA_VPY) -c "import sys, torch; v = torch.version.cuda; print('python', sys.version.split()[0], '| torch', \
	  torch.__version__, '| CUDA', v); assert v == '$(CUDA_VERSION)', f'torch built for CUDA {v}: set CUDA_TORCH_PIP'"
	CUDA_HOME=$(CUDA_HOME) FASTBIND_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=$(CUDA_JOBS) \
	  nice -n 10 $(CUDA_VPY) setup.py -q build_ext --build-lib build/cuda/lib --build-temp build/cuda/tmp
	$(CUDA_VPY) -m benchmarks.cuda_link_check
cuda-ext: cuda-build

lint: venv
	$(VENV)/bin/ruff check fastbind benchmarks tests setup.py
	$(VENV)/bin/ruff format --check fastbind benchmarks tests setup.py

format: venv
	$(VENV)/bin/ruff format fastbind benchmarks tests setup.py
	$(VENV)/bin/ruff check --fix fastbind benchmarks tests setup.py

clean:
	rm -rf build fastbind/*.so
