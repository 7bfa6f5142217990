#!/usr/bin/env python
"""Builds the `mimicdet` package and its compiled op library `mimicdet._C`.

The op is built for the CPU by default, and for CUDA too when a GPU is visible or when
FORCE_CUDA=1 (set TORCH_CUDA_ARCH_LIST to choose the architectures, e.g. "8.0;9.0").
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

PACKAGE_ROOT = os.path.join("projects", "MimicDet")
CSRC_DIR = os.path.join(PACKAGE_ROOT, "mimicdet", "layers", "csrc")


def wants_cuda():
    import torch

    if os.getenv("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def get_extensions():
    cpp_sources = sorted(glob.glob(os.path.join(CSRC_DIR, "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC_DIR, "**", "*.cu"), recursive=True))
    if not cpp_sources:
        return []
    extension, sources = CppExtension, cpp_sources
    define_macros = []
    extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
    if wants_cuda():
        extension, sources = CUDAExtension, cpp_sources + cuda_sources
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    return [
        extension(
            "mimicdet._C",
            sources,
            include_dirs=[os.path.abspath(CSRC_DIR)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            # -lstdc++ before the driver's own: a compiler that links libstdc++ statically (the
            # H200 image's did: ldd listed none) then links the shared one, as torch does. A static
            # copy breaks c10's message formatting: TORCH_CHECK messages stopped at the first shape
            # here, and crashed the process there (docs/gpu_check.md, section 4).
            extra_link_args=["-fopenmp", "-lstdc++"],
        )
    ]


setup(
    packages=find_packages(PACKAGE_ROOT),
    package_dir={"": PACKAGE_ROOT},
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
