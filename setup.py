"""Builds the one torch extension, ``lorafusion._C``, from csrc/.

All csrc/**/*.cpp are always compiled; csrc/**/*.cu are added (CUDAExtension) when torch is a CUDA build and nvcc
is found, else a CppExtension is built from the .cpp files alone. CUDA architectures come from
TORCH_CUDA_ARCH_LIST when set, else from the visible devices (torch's own detection), never from a GPU-name list.
Set LORAFUSION_SKIP_EXTENSION=1 to install the pure-Python package only (the cpu/cuda backends then report
themselves unavailable).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(ext: str) -> list[str]:
    # Relative paths: setuptools rejects absolute source paths in editable / wheel builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", f"*.{ext}"), recursive=True))


def _nvcc_available() -> bool:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None


def _extensions():
    if os.environ.get("LORAFUSION_SKIP_EXTENSION", "0") == "1":
        print("lorafusion: LORAFUSION_SKIP_EXTENSION=1, building no extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp = _sources("cpp")
    cu = _sources("cu")
    # Each source compiles to build/<dir>/<stem>.o: two sources with one stem (a.cpp and a.cu) make ninja refuse
    # the build ("multiple rules generate ...a.o"), which surfaces on a CUDA machine only.
    stems: dict[str, str] = {}
    for src in cpp + cu:
        stem = os.path.splitext(src)[0]
        if stem in stems:
            raise SystemExit(f"setup.py: sources {stems[stem]!r} and {src!r} would compile to one object file "
                             f"({stem}.o); rename one of them")
        stems[stem] = src
    cxx_flags = ["-O3", "-fno-trapping-math"]  # lets the masked selects vectorise (torch builds with it too)
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template: without -fopenmp its `omp parallel` is compiled out and every
        # row-block loop runs on one thread. The soname resolves to the libgomp torch has already loaded.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    # a CUDA torch with nvcc but no GPU visible and no TORCH_CUDA_ARCH_LIST: torch cannot pick the arch to build
    # for (an IndexError in _get_cuda_arch_flags), so that machine gets the CPU extension, said below
    arch_known = bool(os.environ.get("TORCH_CUDA_ARCH_LIST")) or (bool(torch.version.cuda)
                                                                 and torch.cuda.device_count() > 0)
    if cu and torch.version.cuda and _nvcc_available() and arch_known:
        # No --use_fast_math: the rank-r path and the dropout scale must match the float64 reference closely.
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        print(f"lorafusion: building CUDA extension from {len(cpp)} .cpp and {len(cu)} .cu files")
        ext = CUDAExtension(
            "lorafusion._C", cpp + cu, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags,
        )
    else:
        why = ("no .cu files" if not cu else "torch is a CPU build" if not torch.version.cuda
               else "nvcc not found" if not _nvcc_available()
               else "no GPU visible and TORCH_CUDA_ARCH_LIST unset: set it, e.g. 9.0, to build the CUDA kernels")
        print(f"lorafusion: building CPU-only extension from {len(cpp)} .cpp files ({why})")
        ext = CppExtension("lorafusion._C", cpp, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=link_flags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
