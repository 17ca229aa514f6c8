"""Builds the C++ extension ``fastbind._C`` (CPU kernels, optionally CUDA kernels).

FASTBIND_BUILD_CUDA: ``0`` never builds the CUDA part, ``1`` always does (fails without nvcc and a
CUDA build of torch), ``auto`` (default) builds it when torch is a CUDA build *and* CUDA_HOME is set.
We never decide from ``torch.cuda.is_available()``: build machines often have no GPU.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    import torch

    flag = os.environ.get("FASTBIND_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no"):
        return False
    if flag in ("1", "true", "yes"):
        return True
    return torch.version.cuda is not None and bool(os.environ.get("CUDA_HOME"))


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-math-errno: sqrt in the epilogue loops compiles to a vector sqrt (with errno, gcc keeps a
    # scalar sqrt plus a libm call for negative inputs; the optimize attribute of FB_MULTIVERSION does
    # not reach the always_inline helpers). Nothing here reads errno.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if _want_cuda():
        cu = sorted(glob.glob("csrc/cuda/*.cu"))
        return [
            CUDAExtension(
                "fastbind._C",
                sources + cu,
                include_dirs=include_dirs,
                define_macros=[("FASTBIND_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "fastbind._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


if os.environ.get("FASTBIND_NO_EXT") == "1":
    # `make venv` registers the package (editable) without compiling; `make build` then compiles
    # the extension once, incrementally, next to the sources.
    setup()
else:
    setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
