"""Every Triton kernel compiles for sm_90 and sm_80 with zero spills, shared memory within the
sm_90 limit, and (bfloat16 GEMM variants on sm_90) wgmma instructions — checked without a GPU.

The compile must run with TRITON_INTERPRET unset, so it runs in a subprocess (the test session
itself interprets the kernels).
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.triton_resources import FAMILIES, SHARED_LIMIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=FAMILIES)
def resources(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / f"{request.param}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.triton_resources", "--family", request.param, "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows, f"no kernels reported for {request.param}"
    return request.param, rows


def test_both_targets_and_dtypes_compiled(resources):
    family, rows = resources
    assert {r["arch"] for r in rows} == {"sm_90", "sm_80"}, family
    assert {r["dtype"] for r in rows} >= {"fp32", "bf16"}, family


def test_no_spills(resources):
    _, rows = resources
    spilling = [
        (r["kernel"], r["arch"], r["spill_stores"], r["spill_loads"])
        for r in rows
        if r["spill_stores"] or r["spill_loads"]
    ]
    assert not spilling, f"kernels spill registers: {spilling}"


def test_shared_memory_fits_sm90(resources):
    _, rows = resources
    too_big = [(r["kernel"], r["arch"], r["shared_bytes"]) for r in rows if r["shared_bytes"] > SHARED_LIMIT]
    assert not too_big, f"shared memory above {SHARED_LIMIT} bytes: {too_big}"


def test_bf16_uses_wgmma_on_sm90(resources):
    _, rows = resources
    expected = [r for r in rows if r["expect_wgmma"]]
    assert expected, "no bf16 variant is marked expect_wgmma"
    missing = [r["kernel"] for r in expected if not r["wgmma"]]
    assert not missing, f"bf16 sm_90 variants without wgmma: {missing}"
