"""Build ``elra_fused._C``: C++ CPU kernels always, CUDA kernels when possible.

    CUDA_HOME=/usr/local/cuda python setup.py build_ext --inplace

Environment:
  ELRA_SKIP_CUDA_BUILD=1   build the CPU kernels only (fast iteration, no nvcc needed).
  TORCH_CUDA_ARCH_LIST     CUDA targets; defaults to "8.0;9.0" (A100, H100/H200).
  MAX_JOBS                 parallel compile jobs (ninja).

The CUDA part is compiled when torch was built with CUDA (``torch.version.cuda``) and
nvcc is found (``CUDA_HOME``); a GPU is not needed to build it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from setuptools import Extension, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
# csrc/ by device: common.h (shared checks) is included by both; module.cpp registers the
# CPU table always and the CUDA table when ELRA_WITH_CUDA is defined; layout_checks.cpp
# holds the per-parameter layout's host-side step checks (device-independent).
CPU_SOURCES = [
    f"{CSRC}/module.cpp",
    f"{CSRC}/layout_checks.cpp",
    f"{CSRC}/cpu/ops.cpp",
    f"{CSRC}/cpu/list_ops.cpp",
]
CUDA_SOURCES = [f"{CSRC}/cuda/ops.cu", f"{CSRC}/cuda/list_ops.cu"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"

# Portable flags only: the built artefact may run on another x86-64 machine, so no
# -march=native; the hot loops also have an AVX2 build chosen at run time (kernels.h).
# -O3 turns on the loop vectorizer. No -ffast-math: the kernels rely on IEEE semantics
# (NaN propagation into the retrace test, exact x_prev - x differences).
# -ffp-contract=off: never fuse a * b + c into an FMA, whatever -m flags a build adds,
# so the baseline and AVX2 loops (and any CPU) round every element alike.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
LINK_FLAGS = ["-fopenmp"]
# No --use_fast_math for the same reason; --fmad=false is nvcc's -ffp-contract=off (an
# update rounds decay * x and step * g before subtracting, as the CPU kernels and torch's
# own elementwise ops do, so the CPU and CUDA builds round alike); -lineinfo keeps
# profilers useful at no cost; --threads=2 compiles the two default architectures in
# parallel.
NVCC_FLAGS = ["-O3", "-lineinfo", "--threads=2", "--fmad=false"]


def _want_cuda() -> tuple[bool, str]:
    if os.environ.get("ELRA_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return False, "ELRA_SKIP_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA"
    if CUDA_HOME is None or not Path(CUDA_HOME, "bin", "nvcc").exists():
        return False, "nvcc not found (set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda)"
    return True, f"nvcc from {CUDA_HOME}"


def _extension() -> Extension:
    with_cuda, why = _want_cuda()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        print(
            f"elra_fused: compiling CUDA kernels ({why}; "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})",
            flush=True,
        )
        return CUDAExtension(
            name="elra_fused._C",
            sources=CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("ELRA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=LINK_FLAGS,
        )
    print(f"elra_fused: NOT compiling CUDA kernels ({why}); CPU kernels only", flush=True)
    return CppExtension(
        name="elra_fused._C",
        sources=CPU_SOURCES,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=LINK_FLAGS,
    )


setup(
    name="elra_fused",
    version="0.1.0",
    description="Fast PyTorch implementation of the ELRA optimizer (fused kernels)",
    python_requires=">=3.10",
    packages=["elra_fused"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
