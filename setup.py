"""Build of the optional compiled kernel; everything else is declared in pyproject.toml.

The kernel is plain C (no Python or torch headers), loaded by `peft_glider/native.py` through ctypes. It is built
with OpenMP where the compiler supports it (`-fopenmp`), else single-threaded with a warning (e.g. Apple clang
without libomp), else skipped with a warning: the pure-torch kernels then run. Never silently.
"""

import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_FLAGS = ["-fopenmp"]


class BuildKernel(build_ext):
    """Try the kernel with OpenMP, then without, then give up on it; warn at each step down."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
            return
        except Exception as error:  # noqa: BLE001 - the compiler's error type varies by platform
            warnings.warn(f"peft-glider: building the CPU kernel with OpenMP failed ({error}); retrying "
                          "single-threaded.", stacklevel=1)
        ext.extra_compile_args = [flag for flag in ext.extra_compile_args if flag not in OPENMP_FLAGS]
        ext.extra_link_args = [flag for flag in ext.extra_link_args if flag not in OPENMP_FLAGS]
        try:
            super().build_extension(ext)
            warnings.warn("peft-glider: the CPU kernel was built without OpenMP: it runs on one thread.",
                          stacklevel=1)
        except Exception as error:  # noqa: BLE001
            warnings.warn(f"peft-glider: the CPU kernel could not be built ({error}); the pure-torch kernels "
                          "will run instead (correct, slower on CPU).", stacklevel=1)


setup(
    ext_modules=[
        Extension(
            "peft_glider._selected_experts",
            sources=["peft_glider/csrc/selected_experts.c"],
            extra_compile_args=["-O3", "-std=c11", *OPENMP_FLAGS],
            extra_link_args=[*OPENMP_FLAGS, "-lm"],
        )
    ],
    cmdclass={"build_ext": BuildKernel},
)
