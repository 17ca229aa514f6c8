"""The link check of `make cuda-build` (benchmarks/cuda_link_check.py): its op list comes from the op
tables, and it fails on an extension without CUDA kernels (the CPU build of `make build`). The check
itself, on the CUDA build, runs in `make cuda-build` (it needs the ~4.7 GB CUDA torch)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cuda_link_check
from fastbind._backend import extension_loaded
from fastbind.ops._registry import TABLES

ROOT = Path(__file__).resolve().parents[1]


def test_the_op_list_is_every_cuda_row_forward_and_backward():
    assert cuda_link_check.cuda_op_names() == [
        "fastbind::gram_volume_fwd",
        "fastbind::gram_volume_bwd",
        "fastbind::gram_loss_fwd",
        "fastbind::gram_loss_bwd",
        "fastbind::infonce_fwd",
        "fastbind::infonce_bwd",
        "fastbind::codebook_lookup_fwd",
    ]


def _cuda_build() -> bool:
    return extension_loaded() and "cuda" in torch.ops.fastbind.build_info().split()


def test_missing_kernels_and_unbuilt_rows_agree():
    """The dispatcher's answer (an op without a CUDA kernel) and the registry's (a cuda row not
    built) name the same tables: none in a CUDA build of fastbind._C, all of them otherwise."""
    missing = set(cuda_link_check.missing_cuda_kernels())
    unbuilt = set(cuda_link_check.unbuilt_cuda_rows())
    assert unbuilt == {t.name for t in TABLES.values() if missing & set(t.op_names("cuda"))}
    assert unbuilt == (set() if _cuda_build() else set(TABLES))


def test_loading_after_fastbind_is_refused():
    with pytest.raises(RuntimeError, match="before importing fastbind"):
        cuda_link_check.load_as_fastbind_c(Path("unused.so"))


@pytest.mark.skipif(not extension_loaded(), reason="fastbind._C not built (`make build`)")
def test_the_check_on_the_built_extension():
    """Run as `make cuda-build` runs it, on this process's fastbind._C: make test's CPU build fails it
    (every op reported missing, exit status 1); a CUDA build passes."""
    import fastbind._C as ext

    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.cuda_link_check", ext.__file__],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    n = len(cuda_link_check.cuda_op_names())
    if _cuda_build():
        assert res.returncode == 0 and f"OK: {n} CUDA ops registered" in res.stdout, res.stdout + res.stderr
    else:
        assert res.returncode == 1, res.stdout + res.stderr
        assert res.stdout.count("CUDA kernel: MISSING") == n
        assert "fastbind._C built without CUDA kernels" in res.stdout
        assert "FAILED" in res.stderr
