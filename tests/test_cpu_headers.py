"""The shared per-element math of the C++ kernels (csrc/include/fastbind/*.h, issue 10 point 2) and the
guard of its SIMD multiversioning macro, compiled here by the system compiler in a subprocess.

* tests/cpp/epilogue_check.cpp checks fast_exp (relative error, subnormal range, under/overflow,
  NaN; the vectorised clones against the scalar function), the online log-sum-exp (against double,
  -inf and NaN handling), the GRAM distance and its backward clamp, and the top-k insert (ties to
  the lowest index, NaN never inserted) — with FB_MULTIVERSION on and forced off.
* FB_MULTIVERSION (fastbind/simd.h) makes target clones only for gcc on x86-64 and is empty for any
  other compiler or architecture, so those builds compile plain code instead of failing.
* With nvcc on PATH the headers compile as CUDA device code (the CUDA kernels include them).
"""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCLUDE = os.path.join(ROOT, "csrc", "include")
CHECK = os.path.join(ROOT, "tests", "cpp", "epilogue_check.cpp")
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


def _compile(out, source, *flags, link=True):
    cmd = [CXX, "-std=c++17", "-O3", "-fopenmp-simd", "-ffp-contract=fast", "-Wall", "-Wextra", "-Werror"]
    cmd += [f"-I{INCLUDE}", *flags, source, "-o", str(out)]
    if not link:
        cmd.insert(1, "-c")
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module", params=["multiversion", "plain"])
def checker(request, tmp_path_factory):
    flags = [] if request.param == "multiversion" else ["-DFASTBIND_NO_MULTIVERSION"]
    exe = _compile(tmp_path_factory.mktemp(request.param) / "epilogue_check", CHECK, *flags)
    return exe, request.param


@pytest.mark.parametrize("group", ["exp", "exp_bounded", "lse", "gram", "topk"])
def test_shared_math(checker, group):
    exe, mode = checker
    res = subprocess.run([str(exe), group], capture_output=True, text=True)
    assert res.returncode == 0 and "FAIL" not in res.stdout, res.stdout[-3000:]
    assert "checked" in res.stdout
    if mode == "plain":
        assert "multiversioned 0" in res.stdout


def _symbols(tmp_path, *flags):
    """Symbols of a translation unit with one FB_MULTIVERSION function, compiled with `flags`."""
    src = tmp_path / "mv.cpp"
    src.write_text(
        '#include "fastbind/simd.h"\n'
        "FB_MULTIVERSION float fb_mv_probe(const float* x, int n) {\n"
        "  float s = 0;\n  for (int i = 0; i < n; ++i) s += x[i] * x[i];\n  return s;\n}\n"
        "int fb_mv_enabled = FB_MULTIVERSIONED;\n"
    )
    obj = _compile(tmp_path / "mv.o", str(src), *flags, link=False)
    return subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout


def _is_x86_gcc():
    res = subprocess.run([CXX, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True)
    return "__x86_64__" in res.stdout and "__clang__" not in res.stdout


@pytest.mark.parametrize(
    "flags",
    [
        (),
        ("-DFASTBIND_NO_MULTIVERSION",),
        ("-U__x86_64__",),  # another architecture: the macro must not name x86 targets
        ("-D__clang__",),  # clang spells the x86-64 levels differently: plain code
    ],
    ids=["default", "forced-off", "not-x86", "clang"],
)
def test_multiversion_guard(tmp_path, flags):
    """Target clones (an ifunc resolver plus one clone per level) only for gcc on x86-64; every other
    branch compiles one plain function, with no x86-specific attribute to reject."""
    symbols = _symbols(tmp_path, *flags)
    assert "fb_mv_probe" in symbols
    cloned = ".resolver" in symbols or "arch_x86_64_v4" in symbols
    if not flags and _is_x86_gcc():
        assert cloned and "arch_x86_64_v3" in symbols and ".default" in symbols, symbols
    elif flags:
        assert not cloned, symbols


def test_kernel_compiles_without_multiversioning(tmp_path):
    """A real kernel translation unit (csrc/cpu/infonce.cpp, torch headers) compiles with the macro's
    plain branch, as on a non-x86 or clang build."""
    torch_ext = pytest.importorskip("torch.utils.cpp_extension")
    flags = ["-fsyntax-only", "-std=c++20", "-fopenmp", "-DFASTBIND_NO_MULTIVERSION"]
    flags += [f"-I{p}" for p in torch_ext.include_paths()]
    cmd = [CXX, *flags, f"-I{INCLUDE}", os.path.join(ROOT, "csrc", "cpu", "infonce.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_headers_compile_as_cuda_device_code(tmp_path):
    """The CUDA kernels include these headers: every function compiles for the device (FB_HD)."""
    src = tmp_path / "k.cu"
    src.write_text(
        '#include "fastbind/epilogue.h"\n#include "fastbind/gram_math.h"\n#include "fastbind/topk.h"\n'
        "__global__ void probe(const float* x, float* y, long long* id, int n) {\n"
        "  const int i = blockIdx.x * blockDim.x + threadIdx.x;\n  if (i >= n) return;\n"
        "  float m = -fastbind::fb_inf(), s = 0.f;\n  fastbind::lse_push(m, s, x[i]);\n"
        "  fastbind::lse_merge(m, s, 1.f, 2.f);\n  const float p[2] = {x[i], s};\n"
        "  float sc[4];\n  long long ix[4];\n  fastbind::topk_init(sc, ix, 4);\n"
        "  fastbind::topk_push(sc, ix, 4, fastbind::gram_distance(m, p, 2), (long long)i);\n"
        "  double dd[4] = {1, 2, 3, 0};\n  fastbind::sort_by_distance_then_index(dd, ix, 4);\n"
        "  y[i] = fastbind::fast_exp(x[i]) + fastbind::lse_rescale(m, s, 3.f) +\n"
        "         fastbind::gram_backward_coef(1.f, 2.f, sc[0], fastbind::gram_distance_eps(s)) +\n"
        "         fastbind::gram_scaled_volume(1.f, 2.f, fastbind::gram_distance_from_residual(s));\n"
        "  id[i] = ix[0];\n}\n"
    )
    cmd = ["nvcc", "-std=c++17", "-c", f"-I{INCLUDE}", str(src), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
