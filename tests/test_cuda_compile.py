"""Every launchable CUDA kernel instantiation compiles with nvcc for sm_80 and sm_90a (issue 11),
without a GPU: no spills, no stack frame, shared memory within the sm_80 limit, and tensor-core
instructions (HMMA; HMMA or HGMMA on sm_90a) in the SASS of every 16-bit GEMM kernel.

The kernels are the ``FASTBIND_CUDA_KERNELS_<family>(X)`` lists of csrc/cuda/*.cuh (see
benchmarks/cuda_resources.py, which also prints the resource table of benchmarks/README.md).
nvcc is part of the build environment: where it is missing the test fails and says so.
Compiles are cached by a hash of the kernel headers, so an unchanged tree costs nothing.
"""

from __future__ import annotations

import pytest

from benchmarks import cuda_resources as cr

ENTRIES = cr.entries()


@pytest.fixture(scope="module")
def compiled():
    if cr.nvcc_path() is None:
        pytest.fail(
            f"nvcc not found (CUDA_HOME={cr.cuda_home()}, nor on PATH): the CUDA compile check needs the CUDA "
            "toolkit (nvcc 12.8+); set CUDA_HOME to it"
        )
    if cr.cuobjdump_path() is None:
        pytest.fail("cuobjdump not found (triton wheel's backends/nvidia/bin, or CUDA_HOME/bin)")
    return dict(zip((e.name for e in ENTRIES), cr.collect(jobs=2)))


def test_kernel_lists_found():
    families = {e.family for e in ENTRIES}
    assert "codebook" in families, families
    assert len({e.name for e in ENTRIES}) == len(ENTRIES), "kernel names must be unique"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_kernel_compiles_without_spills(compiled, entry):
    row = compiled[entry.name]
    assert row["smem_bytes"] <= cr.SMEM_LIMIT, f"{entry.name}: {row['smem_bytes']} bytes of shared memory"
    for arch in cr.ARCHS:
        info = row["archs"].get(arch)
        assert info is not None, f"{entry.name}: no {arch} code"
        assert info["entries"] == 1, (
            f"{entry.name}: {info['entries']} kernels in its unit (non-template kernels in a header?)"
        )
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, f"{entry.name} {arch}: spills {info}"
        assert info["stack"] == 0, f"{entry.name} {arch}: {info['stack']} bytes stack frame"
        if entry.tensor_cores:
            assert info["hmma"] + info["hgmma"] > 0, f"{entry.name} {arch}: no tensor-core instruction in the SASS"


def test_ptxas_and_sass_parsers():
    """The parsers see spills, stack frames and MMA instructions (so the checks above can fail)."""
    log = (
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_80'\n"
        "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    assert cr._parse_ptxas(log) == {
        "sm_80": {"entries": 1, "registers": 255, "stack": 16, "spill_stores": 8, "spill_loads": 4}
    }
    sass = (
        "\tarch = sm_90a\n  /*0100*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;\n"
        "\tarch = sm_80\n  HMMA.16816.F32.BF16 R8, R4, R2, R8 ;"
    )
    assert cr._count_mma(sass) == {"sm_90a": {"hmma": 0, "hgmma": 1}, "sm_80": {"hmma": 1, "hgmma": 0}}
